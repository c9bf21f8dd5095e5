#!/usr/bin/env bash
# Step 2: train the pairwise reward model from the SFT model, then evaluate it on the held-out pairs.
#   bash training_scripts/step2.sh [OUTPUT] [ZERO_STAGE]
# Reads OUTPUT/step1_sft/final and DATA/{preference,eval} (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step2_reward.
# Knobs: EPOCHS, MAX_SEQ_LEN, BATCH, LR, LORA_DIM, RM_BASE (model dir to start from; default the SFT
# export), DTYPE, FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 20 --eval_interval 20 --save_interval 10); else STEPS=(--num_train_epochs "${EPOCHS:-3}" --eval_interval 100 --save_interval 100); fi
DATA="$(data_dir)"
EVAL=()  # held-out pairs, when data_process wrote some
if [ -s "$DATA/eval/preference.jsonl" ]; then EVAL=(--eval_pairs "$DATA/eval/preference.jsonl"); fi
launch "$REPO/step2_reward_model/main.py" \
    --model_name_or_path "${RM_BASE:-$OUTPUT/step1_sft/final}" \
    --data_path "$DATA/preference" \
    --max_seq_len "${MAX_SEQ_LEN:-320}" \
    --per_device_train_batch_size "${BATCH:-16}" \
    --per_device_eval_batch_size 16 \
    --learning_rate "${LR:-5e-4}" \
    --num_warmup_steps 20 \
    --weight_decay 0.0 \
    --lora_dim "${LORA_DIM:-0}" \
    --zero_stage "$ZERO_STAGE" \
    --dtype "${DTYPE:-auto}" \
    --eval_batches 0 \
    "${STEPS[@]}" ${EVAL[@]+"${EVAL[@]}"} $(force_flag) \
    --output_dir "$OUTPUT/step2_reward"
[ ${#EVAL[@]} -eq 0 ] || up_to_date "$OUTPUT/step2_reward/rw_eval.json" "$OUTPUT/step2_reward/done" || run "$PY" "$REPO/step2_reward_model/rw_eval.py" --model "$OUTPUT/step2_reward/final" \
    --pairs "$DATA/eval/preference.jsonl" --max_seq_len "${MAX_SEQ_LEN:-320}" --out "$OUTPUT/step2_reward/rw_eval.json"
