#!/usr/bin/env bash
# Step 1b: supervised fine-tuning of the pretrained model on ChatML conversations.
#   bash training_scripts/step1_sft.sh [OUTPUT] [ZERO_STAGE]
# Reads OUTPUT/step1_pretrain/final (or BASE_MODEL), DATA/sft and, where they exist, the demo's task evals in
# DATA/eval (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step1_sft.
# The settings: recipes/step1_sft.yaml. Knobs overriding it: EPOCHS, MAX_SEQ_LEN, BATCH, LR, LORA_DIM (0 =
# full fine-tuning), PACKING (1 = several conversations per row; 0 = one per row, right-padded),
# LOSS_WEIGHTING (task: each task weighs its share of the conversations; token; conversation), DTYPE;
# FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
STEPS=()
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 30 --eval_interval 30 --save_interval 15 --eval_task_samples 8); fi
DATA="$(data_dir)"
EXTRA=()
# the demo's verifiable tasks are scored when their eval files exist (user data has held-out loss only)
if compgen -G "$DATA/eval/t[123]_*.jsonl" >/dev/null; then EXTRA+=(--eval_task_dir "$DATA/eval"); fi
knob num_train_epochs EPOCHS; knob max_seq_len MAX_SEQ_LEN; knob per_device_train_batch_size BATCH
knob learning_rate LR; knob lora_dim LORA_DIM; knob packing PACKING; knob loss_weighting LOSS_WEIGHTING
knob dtype DTYPE
launch "$REPO/step1_pretrain_sft/main.py" --stage sft --config "$RECIPES/step1_sft.yaml" \
    --model_name_or_path "${BASE_MODEL:-$OUTPUT/step1_pretrain/final}" \
    --data_path "$DATA/sft" \
    --zero_stage "$ZERO_STAGE" \
    ${KNOBS[@]+"${KNOBS[@]}"} ${STEPS[@]+"${STEPS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} $(force_flag) \
    --output_dir "$OUTPUT/step1_sft"
