#!/usr/bin/env bash
# Step 1a: pretrain a LLaMA-style model from scratch on step0's packed tokens.
#   bash training_scripts/step1_pretrain.sh [OUTPUT] [ZERO_STAGE]
# OUTPUT is the chain's root dir (default outputs/demo): reads OUTPUT/step0, writes OUTPUT/step1_pretrain.
# Knobs: PRESET (tiny; base for the 0.1B GPU run), EPOCHS, MAX_SEQ_LEN, BATCH, LR, DTYPE (auto), FAST=1,
# NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh). A GPU run of the 0.1B model, for example:
#   PRESET=base BATCH=32 MAX_SEQ_LEN=1024 DTYPE=bf16 bash training_scripts/step1_pretrain.sh outputs/gpu 2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 40 --eval_interval 20 --save_interval 20); else STEPS=(--num_train_epochs "${EPOCHS:-3}" --eval_interval 200 --save_interval 200); fi
launch "$REPO/step1_pretrain_sft/main.py" --stage pretrain \
    --preset "${PRESET:-tiny}" \
    --data_path "$OUTPUT/step0/tokens" \
    --tokenizer_path "$OUTPUT/step0/tokenizer" \
    --max_seq_len "${MAX_SEQ_LEN:-256}" \
    --per_device_train_batch_size "${BATCH:-16}" \
    --learning_rate "${LR:-2e-3}" \
    --num_warmup_steps 100 \
    --weight_decay 0.1 \
    --zero_stage "$ZERO_STAGE" \
    --dtype "${DTYPE:-auto}" \
    --eval_batches 20 \
    "${STEPS[@]}" $(force_flag) \
    --output_dir "$OUTPUT/step1_pretrain"
