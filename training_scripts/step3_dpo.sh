#!/usr/bin/env bash
# Step 3, DPO path: direct preference optimisation of the SFT model, then a comparison with the SFT model
# on held-out prompts under the step 2 reward model (mean score, win-rate, degeneration figures).
#   bash training_scripts/step3_dpo.sh [OUTPUT] [ZERO_STAGE]
# Reads OUTPUT/step1_sft/final, DATA/{preference,eval} (DATA: DATA_DIR or OUTPUT/data) and OUTPUT/step2_reward/final (for the
# comparison only); writes OUTPUT/step3_dpo (final/ and eval.json).
# Knobs: LOSS_TYPE (dpo|cdpo|ipo|simpo), BETA, RPO_ALPHA, EPOCHS, BATCH, LR, LORA_DIM, DTYPE, FAST=1, NUM_GPUS,
# HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 20 --eval_interval 20 --save_interval 10); EVAL_N=16; else STEPS=(--num_train_epochs "${EPOCHS:-2}" --eval_interval 100 --save_interval 100); EVAL_N=200; fi
DATA="$(data_dir)"
EVAL=()  # held-out pairs, when data_process wrote some
if [ -s "$DATA/eval/preference.jsonl" ]; then EVAL=(--eval_pairs "$DATA/eval/preference.jsonl"); fi
HELD_OUT="$DATA/eval/prompts.jsonl"
launch "$REPO/step3_rlhf_ppo/dpo.py" \
    --model_name_or_path "$OUTPUT/step1_sft/final" \
    --data_path "$DATA/preference" \
    --loss_type "${LOSS_TYPE:-dpo}" \
    --beta "${BETA:-0.1}" \
    --rpo_alpha "${RPO_ALPHA:-0.5}" \
    --max_seq_len "${MAX_SEQ_LEN:-320}" \
    --per_device_train_batch_size "${BATCH:-16}" \
    --per_device_eval_batch_size 16 \
    --learning_rate "${LR:-5e-5}" \
    --num_warmup_steps 20 \
    --weight_decay 0.0 \
    --lora_dim "${LORA_DIM:-0}" \
    --zero_stage "$ZERO_STAGE" \
    --dtype "${DTYPE:-auto}" \
    --eval_batches 0 \
    "${STEPS[@]}" ${EVAL[@]+"${EVAL[@]}"} $(force_flag) \
    --output_dir "$OUTPUT/step3_dpo"
[ ! -s "$HELD_OUT" ] || up_to_date "$OUTPUT/step3_dpo/eval.json" "$OUTPUT/step3_dpo/done" "$OUTPUT/step1_sft/done" || run "$PY" "$REPO/step3_rlhf_ppo/evaluate.py" --policy "$OUTPUT/step3_dpo/final" \
    --baseline "$OUTPUT/step1_sft/final" --reward_model "$OUTPUT/step2_reward/final" \
    --prompts "$HELD_OUT" --num_prompts "$EVAL_N" --out "$OUTPUT/step3_dpo/eval.json" $(judge_flag "$DATA")
