#!/usr/bin/env bash
# Step 2: train the pairwise reward model from the SFT model, then evaluate it on the held-out pairs.
#   bash training_scripts/step2.sh [OUTPUT] [ZERO_STAGE]
# Reads OUTPUT/step1_sft/final and DATA/{preference,eval} (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step2_reward
# (final/, rw_eval.json on the held-out pairs, rw_eval_unmatched.json on those not matched by length).
# The settings: recipes/step2_reward.yaml. Knobs overriding it: EPOCHS, MAX_SEQ_LEN, BATCH, LR, LORA_DIM,
# DTYPE; RM_BASE (model dir to start from; default the SFT export), FAST=1, NUM_GPUS, HOSTFILE, FORCE=1
# (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
ZERO_STAGE="${2:-${ZERO_STAGE:-0}}"
STEPS=()
if [ "$FAST" = "1" ]; then STEPS=(--max_steps 20 --eval_interval 20 --save_interval 10); fi
DATA="$(data_dir)"
EVAL=()  # held-out pairs, when data_process wrote some
if [ -s "$DATA/eval/preference.jsonl" ]; then EVAL=(--eval_pairs "$DATA/eval/preference.jsonl"); fi
knob num_train_epochs EPOCHS; knob max_seq_len MAX_SEQ_LEN; knob per_device_train_batch_size BATCH
knob learning_rate LR; knob lora_dim LORA_DIM; knob dtype DTYPE
RUN="$OUTPUT/step2_reward"
launch "$REPO/step2_reward_model/main.py" --config "$RECIPES/step2_reward.yaml" \
    --model_name_or_path "${RM_BASE:-$OUTPUT/step1_sft/final}" \
    --data_path "$DATA/preference" \
    --zero_stage "$ZERO_STAGE" \
    ${KNOBS[@]+"${KNOBS[@]}"} ${STEPS[@]+"${STEPS[@]}"} ${EVAL[@]+"${EVAL[@]}"} $(force_flag) \
    --output_dir "$RUN"
[ ${#EVAL[@]} -eq 0 ] || up_to_date "$RUN/rw_eval.json" "$RUN/done" || run "$PY" "$REPO/step2_reward_model/rw_eval.py" --model "$RUN/final" \
    --pairs "$DATA/eval/preference.jsonl" --max_seq_len "$(run_option "$RUN" max_seq_len)" --out "$RUN/rw_eval.json"
# held-out pairs whose lengths differ: does the model pay for length? (rw_eval's by-length verdict)
[ ! -s "$DATA/eval/preference_unmatched.jsonl" ] || up_to_date "$RUN/rw_eval_unmatched.json" "$RUN/done" || run "$PY" \
    "$REPO/step2_reward_model/rw_eval.py" --model "$RUN/final" --pairs "$DATA/eval/preference_unmatched.jsonl" \
    --probes false --max_seq_len "$(run_option "$RUN" max_seq_len)" --out "$RUN/rw_eval_unmatched.json"
