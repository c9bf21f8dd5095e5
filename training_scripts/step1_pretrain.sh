#!/usr/bin/env bash
# Step 1a: pretrain a LLaMA-style model from scratch on step0's packed tokens.
#   bash training_scripts/step1_pretrain.sh [OUTPUT] [ZERO_STAGE]
# OUTPUT is the chain's root dir (default outputs/demo): reads OUTPUT/step0, writes OUTPUT/step1_pretrain.
# The settings: recipes/step1_pretrain.yaml. Knobs overriding it: PRESET (base for the 0.1B GPU run), EPOCHS,
# MAX_SEQ_LEN, BATCH, LR, DTYPE; FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh). The 0.1B model on a GPU:
#   PRESET=base BATCH=32 MAX_SEQ_LEN=1024 DTYPE=bf16 bash training_scripts/step1_pretrain.sh outputs/gpu 2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
STEPS=()
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 40 --eval_interval 20 --save_interval 20); fi
knob preset PRESET; knob num_train_epochs EPOCHS; knob max_seq_len MAX_SEQ_LEN
knob per_device_train_batch_size BATCH; knob learning_rate LR; knob dtype DTYPE
launch "$REPO/step1_pretrain_sft/main.py" --stage pretrain --config "$RECIPES/step1_pretrain.yaml" \
    --data_path "$OUTPUT/step0/tokens" \
    --tokenizer_path "$OUTPUT/step0/tokenizer" \
    --zero_stage "$ZERO_STAGE" \
    ${KNOBS[@]+"${KNOBS[@]}"} ${STEPS[@]+"${STEPS[@]}"} $(force_flag) \
    --output_dir "$OUTPUT/step1_pretrain"
