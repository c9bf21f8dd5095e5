# make setup : create .venv and install everything (idempotent; a no-op when nothing changed)
# make test  : set-up if needed, then the test suite (what .ci/run calls)
# make demo  : set-up if needed, then the whole chain on the built-in Chinese demo data
# make bench : set-up if needed, then the benchmarks (results in bench/results and docs/BENCHMARKS.md)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip show --quiet torch deepspeed transformers >/dev/null
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import utils, torch, deepspeed, transformers, datasets, sentencepiece, peft, snownlp, datasketch"
	@touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	bash training_scripts/run_all.sh

bench: setup
	@test -f bench/run.py || { echo "make bench: no benchmarks yet (bench/run.py, issue #10)" >&2; exit 1; }
	$(PY) -m bench.run

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
