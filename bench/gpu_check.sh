#!/usr/bin/env bash
# One call that checks the CUDA path on a machine with an NVIDIA GPU (about 5-8 minutes):
#   1. the whole chain at smoke size (FAST=1: data, tokenizer, pretraining, SFT, reward model, PPO with
#      DeepSpeed's Hybrid Engine, DPO, GRPO) through the deepspeed launcher, in bf16 where the GPU runs it,
#      with torch's fused CUDA AdamW;
#   2. a base-preset (~0.1B) model: training steps on a DeepSpeed engine and sampled generation;
#   3. a table: step, ok/failed, tokens/s, peak GPU memory (exit status 1 when a row failed).
#     bash bench/gpu_check.sh [OUTPUT]        (default /tmp/gpu_check; logs in OUTPUT/logs)
# A GPU machine often has its own Python with CUDA torch, transformers and peft but no DeepSpeed, datasets,
# snownlp, ...: what is missing is installed from WHEELS (default .whl in the repo, into /tmp/gpu_check_site),
# which `bash bench/gpu_wheels.sh` fills beforehand on a machine with the package registries.
# Without a CUDA GPU it says so in one line and exits 0 (GPU_CHECK_ON_CPU=1 runs it anyway: the plumbing test).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PY:-}"
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
OUT="${1:-/tmp/gpu_check}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

if [ "${GPU_CHECK_ON_CPU:-0}" != "1" ] && \
   ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is not True): nothing run"
    exit 0
fi

# the packages the chain imports that this Python lacks, installed from the prepared wheels
missing="$("$PY" - <<'EOF'
import importlib.util
names = {"deepspeed": "deepspeed", "datasets": "datasets", "snownlp": "snownlp", "datasketch": "datasketch",
         "opencc": "opencc", "sentencepiece": "sentencepiece", "yaml": "pyyaml", "xxhash": "xxhash",
         "peft": "peft", "transformers": "transformers", "matplotlib": "matplotlib", "psutil": "psutil"}
print(" ".join(p for m, p in names.items() if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ]; then
    WHEELS="${WHEELS:-$REPO/.whl}"
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "gpu_check: $PY lacks $missing, and $WHEELS holds no wheels: run bash bench/gpu_wheels.sh on a" \
             "machine with the package registries and bring its folder (WHEELS=DIR)" >&2
        exit 2
    fi
    echo "+ installing from $WHEELS (missing: $missing)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        "$WHEELS"/*.whl || { echo "gpu_check: installing the wheels of $WHEELS failed (see above)" >&2; exit 2; }
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import torch; print("+ torch", torch.__version__, "CUDA", torch.version.cuda, "|",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (GPU_CHECK_ON_CPU=1)")' >&2

rm -rf "$OUT"
mkdir -p "$OUT/logs"
export PY FAST=1 HYBRID_ENGINE=1
start=$(date +%s)
if bash "$REPO/training_scripts/run_all.sh" "$OUT" > "$OUT/logs/chain.log" 2>&1; then
    echo "+ chain finished in $(( $(date +%s) - start )) s" >&2
else
    echo "+ the chain stopped after $(( $(date +%s) - start )) s; the end of $OUT/logs/chain.log:" >&2
    tail -n 25 "$OUT/logs/chain.log" >&2
fi
start=$(date +%s)
"$PY" -m bench.gpu_check base "$OUT" > "$OUT/logs/base.log" 2>&1 || tail -n 25 "$OUT/logs/base.log" >&2
echo "+ base-preset check: $(( $(date +%s) - start )) s" >&2
"$PY" -m bench.gpu_check table "$OUT"
