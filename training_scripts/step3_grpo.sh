#!/usr/bin/env bash
# Step 3, group-relative path: RL from verifiable rewards (GRPO and its variants) of the SFT model on the
# demo's task items, then the held-out task scores (greedy, as SFT's evaluation) and, where a reward model
# and held-out prompts exist, the free-form comparison with the SFT model (evaluate.py).
#   bash training_scripts/step3_grpo.sh [ACTOR_MODEL_PATH] [ACTOR_ZERO_STAGE] [OUTPUT]
# Reads DATA/rl and DATA/eval (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step3_grpo (final/, samples.jsonl,
# tasks.json, eval.json).
# Defaults: 100 steps of 8 prompts x 8 replies in one mini-batch (one optimizer step per batch), lr 5e-5,
# temperature 0.8 (docs/RESULTS.md has the runs behind them).
# Knobs: STEPS, GEN_BATCH (prompts per step), GROUP (replies per prompt), TRAIN_BATCH, LR, KL, TEMPERATURE,
# ANSWER_LEN, ESTIMATOR (grpo|dr_grpo|rloo|reinforce_pp), AGGREGATION (token_mean|seq_mean_token_mean|
# seq_mean_token_sum_norm), REWARDS (space-separated --reward_funcs), REWARD_WEIGHTS, ACTOR_LORA_DIM,
# HYBRID_ENGINE=1 (CUDA), DTYPE, FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${3:-$OUTPUT}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
ACTOR_MODEL_PATH="${1:-$OUTPUT/step1_sft/final}"
ACTOR_ZERO_STAGE="${2:-${ACTOR_ZERO_STAGE:-0}}"
RUN="$OUTPUT/step3_grpo"
DATA="$(data_dir)"
if [ "$FAST" = "1" ]; then
    STEPS_ARGS=(--max_steps 4 --eval_interval 4 --save_interval 2 --eval_batches 1); SAMPLES=8
else
    STEPS_ARGS=(--max_steps "${STEPS:-100}" --eval_interval 25 --save_interval 25 --eval_batches 3); SAMPLES=300
fi
EXTRA=()
EVALS=()
for task in t1_sentiment t2_segmentation t3_ner; do
    [ ! -s "$DATA/eval/$task.jsonl" ] || EVALS+=("$DATA/eval/$task.jsonl")
done
[ ${#EVALS[@]} -eq 0 ] || EXTRA+=(--eval_data "${EVALS[@]}")
[ "${HYBRID_ENGINE:-0}" = "1" ] && EXTRA+=(--enable_hybrid_engine)
read -r -a REWARD_FUNCS <<< "${REWARDS:-task}"
WEIGHTS=()
[ -z "${REWARD_WEIGHTS:-}" ] || read -r -a WEIGHTS <<< "$REWARD_WEIGHTS"
[ ${#WEIGHTS[@]} -eq 0 ] || EXTRA+=(--reward_weights "${WEIGHTS[@]}")
launch "$REPO/step3_rlhf_ppo/grpo.py" \
    --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
    --data_path "$DATA/rl" \
    --reward_funcs "${REWARD_FUNCS[@]}" \
    --num_generations "${GROUP:-8}" \
    --advantage_estimator "${ESTIMATOR:-grpo}" \
    --loss_aggregation "${AGGREGATION:-token_mean}" \
    --per_device_generation_batch_size "${GEN_BATCH:-8}" \
    --per_device_training_batch_size "${TRAIN_BATCH:-64}" \
    --per_device_eval_batch_size 32 \
    --max_prompt_seq_len 160 \
    --max_answer_seq_len "${ANSWER_LEN:-80}" \
    --temperature "${TEMPERATURE:-0.8}" \
    --actor_learning_rate "${LR:-5e-5}" \
    --num_warmup_steps 5 \
    --kl_coef "${KL:-0}" \
    --ppo_epochs 1 \
    --actor_zero_stage "$ACTOR_ZERO_STAGE" \
    --actor_lora_dim "${ACTOR_LORA_DIM:-0}" \
    --dtype "${DTYPE:-auto}" \
    --samples_interval 10 \
    "${STEPS_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} $(force_flag) \
    --output_dir "$RUN"
# held-out task scores of the export, the same evaluation SFT's final one runs
if [ ${#EVALS[@]} -gt 0 ]; then
    up_to_date "$RUN/tasks.json" "$RUN/done" || run "$PY" "$REPO/step1_pretrain_sft/score_tasks.py" \
        --model "$RUN/final" --eval_task_dir "$DATA/eval" --samples "$SAMPLES" --out "$RUN/tasks.json"
fi
HELD_OUT="$DATA/eval/prompts.jsonl"
if [ -s "$HELD_OUT" ] && [ -f "$OUTPUT/step2_reward/final/config.json" ]; then
    up_to_date "$RUN/eval.json" "$RUN/done" "$ACTOR_MODEL_PATH/model.safetensors" || run "$PY" "$REPO/step3_rlhf_ppo/evaluate.py" \
        --policy "$RUN/final" --baseline "$ACTOR_MODEL_PATH" --reward_model "$OUTPUT/step2_reward/final" \
        --prompts "$HELD_OUT" --num_prompts "$( [ "$FAST" = "1" ] && echo 16 || echo 200 )" --out "$RUN/eval.json" $(judge_flag "$DATA")
fi
