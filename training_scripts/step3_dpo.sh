#!/usr/bin/env bash
# Step 3, DPO path: direct preference optimisation of the SFT model, then a comparison with the SFT model
# on held-out prompts under the step 2 reward model (mean score, win-rate, degeneration figures).
#   bash training_scripts/step3_dpo.sh [OUTPUT] [ZERO_STAGE]
# Reads OUTPUT/step1_sft/final, DATA/{preference,eval} (DATA: DATA_DIR or OUTPUT/data) and OUTPUT/step2_reward/final (for the
# comparison only); writes OUTPUT/step3_dpo (final/ and eval.json).
# The settings: recipes/step3_dpo.yaml. Knobs overriding it:
# LOSS_TYPE (dpo|cdpo|ipo|simpo), BETA, RPO_ALPHA, EPOCHS, MAX_SEQ_LEN, BATCH, LR, LORA_DIM, DTYPE; FAST=1,
# NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
STEPS=()
EVAL_ARGS=()
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 20 --eval_interval 20 --save_interval 10); EVAL_ARGS=(--num_prompts 16); fi
DATA="$(data_dir)"
EVAL=()  # held-out pairs, when data_process wrote some
if [ -s "$DATA/eval/preference.jsonl" ]; then EVAL=(--eval_pairs "$DATA/eval/preference.jsonl"); fi
HELD_OUT="$DATA/eval/prompts.jsonl"
knob loss_type LOSS_TYPE; knob beta BETA; knob rpo_alpha RPO_ALPHA; knob num_train_epochs EPOCHS
knob max_seq_len MAX_SEQ_LEN; knob per_device_train_batch_size BATCH; knob learning_rate LR; knob lora_dim LORA_DIM
knob dtype DTYPE
launch "$REPO/step3_rlhf_ppo/dpo.py" --config "$RECIPES/step3_dpo.yaml" \
    --model_name_or_path "$OUTPUT/step1_sft/final" \
    --data_path "$DATA/preference" \
    --zero_stage "$ZERO_STAGE" \
    ${KNOBS[@]+"${KNOBS[@]}"} ${STEPS[@]+"${STEPS[@]}"} ${EVAL[@]+"${EVAL[@]}"} $(force_flag) \
    --output_dir "$OUTPUT/step3_dpo"
[ ! -s "$HELD_OUT" ] || up_to_date "$OUTPUT/step3_dpo/eval.json" "$OUTPUT/step3_dpo/done" "$OUTPUT/step1_sft/done" || run "$PY" "$REPO/step3_rlhf_ppo/evaluate.py" \
    --policy "$OUTPUT/step3_dpo/final" --baseline "$OUTPUT/step1_sft/final" \
    --reward_model "$OUTPUT/step2_reward/final" --prompts "$HELD_OUT" --out "$OUTPUT/step3_dpo/eval.json" \
    ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"} $(judge_flag "$DATA")
