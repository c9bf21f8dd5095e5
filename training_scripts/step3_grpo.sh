#!/usr/bin/env bash
# Step 3, group-relative path: RL from verifiable rewards (GRPO and its variants) of the SFT model on the
# demo's task items, then the held-out task scores (greedy, as SFT's evaluation) and, where a reward model
# and held-out prompts exist, the free-form comparison with the SFT model (evaluate.py).
#   bash training_scripts/step3_grpo.sh [ACTOR_MODEL_PATH] [ACTOR_ZERO_STAGE] [OUTPUT]
# Reads DATA/rl and DATA/eval (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step3_grpo (final/, samples.jsonl,
# tasks.json, eval.json).
# The settings: recipes/step3_grpo.yaml. Knobs
# overriding it: STEPS, GEN_BATCH (prompts per step), GROUP (replies per prompt), TRAIN_BATCH, LR, KL,
# TEMPERATURE, ANSWER_LEN, ESTIMATOR (grpo|dr_grpo|rloo|reinforce_pp), AGGREGATION (token_mean|
# seq_mean_token_mean|seq_mean_token_sum_norm), REWARDS (space-separated --reward_funcs), REWARD_WEIGHTS,
# ACTOR_LORA_DIM, HYBRID_ENGINE=1 (CUDA), DTYPE; FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${3:-$OUTPUT}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
ACTOR_MODEL_PATH="${1:-$OUTPUT/step1_sft/final}"
ACTOR_ZERO_STAGE="${2:-${ACTOR_ZERO_STAGE:-0}}"
RUN="$OUTPUT/step3_grpo"
DATA="$(data_dir)"
STEPS_ARGS=()
SCORE_ARGS=()
EVAL_ARGS=()
if [ "$FAST" = "1" ]; then
    STEPS_ARGS=(--max_steps 4 --eval_interval 4 --save_interval 2 --eval_batches 1)
    SCORE_ARGS=(--samples 8); EVAL_ARGS=(--num_prompts 16)
fi
EXTRA=()
EVALS=()
for task in t1_sentiment t2_segmentation t3_ner; do
    [ ! -s "$DATA/eval/$task.jsonl" ] || EVALS+=("$DATA/eval/$task.jsonl")
done
[ ${#EVALS[@]} -eq 0 ] || EXTRA+=(--eval_data "${EVALS[@]}")
knob max_steps STEPS; knob per_device_generation_batch_size GEN_BATCH; knob num_generations GROUP
knob per_device_training_batch_size TRAIN_BATCH; knob actor_learning_rate LR; knob kl_coef KL
knob temperature TEMPERATURE; knob max_answer_seq_len ANSWER_LEN; knob advantage_estimator ESTIMATOR
knob loss_aggregation AGGREGATION; knob reward_funcs REWARDS; knob reward_weights REWARD_WEIGHTS
knob actor_lora_dim ACTOR_LORA_DIM; knob enable_hybrid_engine HYBRID_ENGINE; knob dtype DTYPE
launch "$REPO/step3_rlhf_ppo/grpo.py" --config "$RECIPES/step3_grpo.yaml" \
    --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
    --data_path "$DATA/rl" \
    --actor_zero_stage "$ACTOR_ZERO_STAGE" \
    ${KNOBS[@]+"${KNOBS[@]}"} ${STEPS_ARGS[@]+"${STEPS_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} $(force_flag) \
    --output_dir "$RUN"
# held-out task scores of the export, the same evaluation SFT's final one runs
if [ ${#EVALS[@]} -gt 0 ]; then
    up_to_date "$RUN/tasks.json" "$RUN/done" || run "$PY" "$REPO/step1_pretrain_sft/score_tasks.py" \
        --model "$RUN/final" --eval_task_dir "$DATA/eval" \
        --out "$RUN/tasks.json" ${SCORE_ARGS[@]+"${SCORE_ARGS[@]}"}
fi
HELD_OUT="$DATA/eval/prompts.jsonl"
if [ -s "$HELD_OUT" ] && [ -f "$OUTPUT/step2_reward/final/config.json" ]; then
    up_to_date "$RUN/eval.json" "$RUN/done" "$ACTOR_MODEL_PATH/model.safetensors" || run "$PY" "$REPO/step3_rlhf_ppo/evaluate.py" \
        --policy "$RUN/final" --baseline "$ACTOR_MODEL_PATH" \
        --reward_model "$OUTPUT/step2_reward/final" --prompts "$HELD_OUT" --out "$RUN/eval.json" \
        ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"} $(judge_flag "$DATA")
fi
