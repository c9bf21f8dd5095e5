#!/usr/bin/env bash
# Step 1b: supervised fine-tuning of the pretrained model on ChatML conversations.
#   bash training_scripts/step1_sft.sh [OUTPUT] [ZERO_STAGE]
# Reads OUTPUT/step1_pretrain/final (or BASE_MODEL), DATA/sft and, where they exist, the demo's task evals in
# DATA/eval (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step1_sft.
# Knobs: EPOCHS, MAX_SEQ_LEN, BATCH, LR, LORA_DIM (0 = full fine-tuning), PACKING (1 = several
# conversations per row, the default; 0 = one per row, right-padded), LOSS_WEIGHTING (task, the
# default: each task weighs its share of the conversations; token; conversation), DTYPE, FAST=1,
# NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 30 --eval_interval 30 --save_interval 15 --eval_task_samples 8); else STEPS=(--num_train_epochs "${EPOCHS:-2}" --eval_interval 500 --save_interval 250 --eval_task_samples 300); fi
DATA="$(data_dir)"
EXTRA=()
if [ "${PACKING:-1}" = "1" ]; then EXTRA+=(--packing); fi
# the demo's verifiable tasks are scored when their eval files exist (user data has held-out loss only)
if compgen -G "$DATA/eval/t[123]_*.jsonl" >/dev/null; then EXTRA+=(--eval_task_dir "$DATA/eval"); fi
launch "$REPO/step1_pretrain_sft/main.py" --stage sft \
    --model_name_or_path "${BASE_MODEL:-$OUTPUT/step1_pretrain/final}" \
    --data_path "$DATA/sft" \
    --max_seq_len "${MAX_SEQ_LEN:-512}" \
    --per_device_train_batch_size "${BATCH:-8}" \
    --learning_rate "${LR:-1e-3}" \
    --num_warmup_steps 50 \
    --weight_decay 0.0 \
    --lora_dim "${LORA_DIM:-0}" \
    --loss_weighting "${LOSS_WEIGHTING:-task}" \
    --zero_stage "$ZERO_STAGE" \
    --dtype "${DTYPE:-auto}" \
    --eval_batches 10 \
    "${STEPS[@]}" "${EXTRA[@]}" $(force_flag) \
    --output_dir "$OUTPUT/step1_sft"
