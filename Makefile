# make setup : create .venv and install everything (idempotent; a no-op when nothing changed)
# make test  : set-up if needed, then the test suite (what .ci/run calls)
# make demo  : set-up if needed, then the whole chain on the built-in Chinese demo data
# make bench : set-up if needed, then the benchmarks (results in bench/results and docs/BENCHMARKS.md)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

.PHONY: setup browser test demo bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip show --quiet torch deepspeed transformers >/dev/null
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import utils, torch, deepspeed, transformers, datasets, sentencepiece, peft, snownlp, datasketch"
	@touch $@

# Debian's chromium + chromedriver for the chat-page browser test (tests/test_serve.py). System packages
# live outside .venv, so they are checked on every test run (two file tests) rather than behind the stamp;
# `make demo` does not need them.
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  command -v apt-get >/dev/null || { echo "make setup: $(CHROMIUM) or $(CHROMEDRIVER) is missing and" \
	    "apt-get is not available: install chromium and its chromedriver there by hand" >&2; exit 1; }; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  [ -z "$$sudo" ] || command -v sudo >/dev/null || { echo "make setup: $(CHROMIUM) or $(CHROMEDRIVER)" \
	    "is missing: run as root or install sudo, or: apt-get install -y chromium chromium-driver" >&2; exit 1; }; \
	  echo "make setup: installing chromium chromium-driver (apt-get)"; \
	  $$sudo apt-get update -q >/dev/null && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null || exit 1; \
	  test -x $(CHROMIUM) && test -x $(CHROMEDRIVER) || { echo "make setup: apt-get installed chromium but" \
	    "$(CHROMIUM) or $(CHROMEDRIVER) is still missing" >&2; exit 1; }; \
	fi

# Two pytest workers of one thread each (pytest-xdist): most tests start Python processes, which import for
# seconds on one core, so two side by side keep both cores busy (15 -> 11.5 min on 2 cores); one thread per
# worker, because two workers of two threads on two cores collapse. A test file stays on one worker, so its
# module fixtures are built once. TEST_WORKERS=0 runs everything in this process, with torch's default threads.
TEST_WORKERS ?= 2
test: setup browser
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: setup
	bash training_scripts/run_all.sh

bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check "trl==1.16.0" 2>&1 | grep -v "is ignored" || true
	$(PY) -m bench.run
	$(PY) -m bench.report

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
