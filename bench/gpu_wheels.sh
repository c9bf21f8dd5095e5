#!/usr/bin/env bash
# The companion of bench/gpu_check.sh: on a machine with the package registries, put into DIR (default .whl
# in the repo, gitignored) the wheels, for Python 3.12 on x86-64 Linux, of what a GPU machine's own Python
# (CUDA torch, transformers, peft, numpy, pyarrow, pandas, ...) usually lacks for the chain, at the versions
# this checkout pins (requirements.txt, and this .venv for the packages it does not name):
#   bash bench/gpu_wheels.sh [DIR]
# DeepSpeed and snownlp publish source archives only: they are built into wheels here (pure Python; DeepSpeed
# without its compiled ops, which it JIT-builds on first use). Then bring DIR to the GPU machine (WHEELS=DIR
# for gpu_check.sh; it installs them with pip --no-index into /tmp/gpu_check_site). About 60 MB.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
DIR="${1:-$REPO/.whl}"
mkdir -p "$DIR"

# NAME==VERSION as requirements.txt pins it, else as this .venv has it
pinned() {
    local name line
    for name in "$@"; do
        line="$(grep -i "^$name==" "$REPO/requirements.txt" || true)"
        if [ -z "$line" ]; then
            line="$name==$("$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name")"
        fi
        echo "$line"
    done
}

BINARY=(datasets dill multiprocess datasketch opencc hjson pydantic pydantic-core annotated-types
        typing-inspection transformers peft safetensors)
SOURCE=(deepspeed snownlp)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
echo "+ downloading $(pinned "${BINARY[@]}" | tr '\n' ' ')" >&2
# shellcheck disable=SC2046
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DIR" $(pinned "${BINARY[@]}")
echo "+ building $(pinned "${SOURCE[@]}" | tr '\n' ' ')" >&2
# shellcheck disable=SC2046
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DIR" \
    $(pinned "${SOURCE[@]}")
ls -la "$DIR" >&2
du -sh "$DIR" >&2
