#!/usr/bin/env bash
# Step 3: PPO of the SFT model (actor, reference) against the step 2 reward model (critic, reward), then a
# comparison with the SFT model on held-out prompts (mean reward-model score, win-rate, positive share,
# KL, degeneration figures). DeepSpeed-Chat's positional arguments, each defaulting to the demo's outputs:
#   bash training_scripts/step3.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
# Reads DATA/{prompts,eval} (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step3_ppo (final/, critic/, samples.jsonl, eval.json).
# Knobs: STEPS, GEN_BATCH, TRAIN_BATCH, ACTOR_LR, CRITIC_LR, KL, TARGET_KL, KL_HORIZON, TEMPERATURE, ANSWER_LEN, ACTOR_LORA_DIM,
# SHAPING (rule rewards added to the reward model's score; default "repetition", "" = none), SHAPING_WEIGHTS (default 2 for the default),
# EMA=1, HYBRID_ENGINE=1 (CUDA), DTYPE, FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
# On a GPU with the base preset: DTYPE=bf16 HYBRID_ENGINE=1 GEN_BATCH=32 TRAIN_BATCH=16 bash training_scripts/step3.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${5:-$OUTPUT}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
ACTOR_MODEL_PATH="${1:-$OUTPUT/step1_sft/final}"
CRITIC_MODEL_PATH="${2:-$OUTPUT/step2_reward/final}"
ACTOR_ZERO_STAGE="${3:-${ACTOR_ZERO_STAGE:-0}}"
CRITIC_ZERO_STAGE="${4:-${CRITIC_ZERO_STAGE:-0}}"
RUN="$OUTPUT/step3_ppo"
if [ "$FAST" = "1" ]; then
    STEPS_ARGS=(--max_steps 6 --eval_interval 6 --save_interval 3 --eval_batches 1); EVAL_N=16
else
    STEPS_ARGS=(--max_steps "${STEPS:-150}" --eval_interval 50 --save_interval 50 --eval_batches 2); EVAL_N=200
fi
DATA="$(data_dir)"
EXTRA=()
HELD_OUT="$DATA/eval/prompts.jsonl"  # data_process holds out prompts of the demo's or the user's rows
if [ -s "$HELD_OUT" ]; then EXTRA+=(--eval_prompts "$HELD_OUT"); fi
if [ -z "${SHAPING+set}" ]; then SHAPING=repetition; SHAPING_WEIGHTS="${SHAPING_WEIGHTS-2}"; fi  # "" = the RM alone
if [ -n "$SHAPING" ]; then
    EXTRA+=(--shaping_funcs $SHAPING)
    [ -z "${SHAPING_WEIGHTS:-}" ] || EXTRA+=(--shaping_weights $SHAPING_WEIGHTS)
fi
[ "${EMA:-0}" = "1" ] && EXTRA+=(--enable_ema)
[ "${HYBRID_ENGINE:-0}" = "1" ] && EXTRA+=(--enable_hybrid_engine)
launch "$REPO/step3_rlhf_ppo/main.py" \
    --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
    --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
    --data_path "$DATA/prompts" \
    --per_device_generation_batch_size "${GEN_BATCH:-16}" \
    --per_device_training_batch_size "${TRAIN_BATCH:-8}" \
    --per_device_eval_batch_size 16 \
    --max_prompt_seq_len 128 \
    --max_answer_seq_len "${ANSWER_LEN:-64}" \
    --temperature "${TEMPERATURE:-0.7}" \
    --top_p 0.9 \
    --actor_learning_rate "${ACTOR_LR:-1e-5}" \
    --critic_learning_rate "${CRITIC_LR:-1e-5}" \
    --num_warmup_steps 5 \
    --init_kl_coef "${KL:-0.5}" \
    --target_kl "${TARGET_KL:-0}" \
    --kl_horizon "${KL_HORIZON:-200}" \
    --ppo_epochs 1 \
    --actor_zero_stage "$ACTOR_ZERO_STAGE" \
    --critic_zero_stage "$CRITIC_ZERO_STAGE" \
    --actor_lora_dim "${ACTOR_LORA_DIM:-0}" \
    --dtype "${DTYPE:-auto}" \
    --samples_interval 10 \
    "${STEPS_ARGS[@]}" "${EXTRA[@]}" $(force_flag) \
    --output_dir "$RUN"
[ ! -s "$HELD_OUT" ] || up_to_date "$RUN/eval.json" "$RUN/done" "$ACTOR_MODEL_PATH/model.safetensors" || run "$PY" "$REPO/step3_rlhf_ppo/evaluate.py" --policy "$RUN/final" \
    --baseline "$ACTOR_MODEL_PATH" --reward_model "$OUTPUT/step2_reward/final" \
    --prompts "$HELD_OUT" --num_prompts "$EVAL_N" --out "$RUN/eval.json" $(judge_flag "$DATA")
