#!/usr/bin/env bash
# Step 3: PPO of the SFT model (actor, reference) against the step 2 reward model (critic, reward), then a
# comparison with the SFT model on held-out prompts (mean reward-model score, win-rate, positive share,
# KL, degeneration figures). DeepSpeed-Chat's positional arguments, each defaulting to the demo's outputs:
#   bash training_scripts/step3.sh [ACTOR_MODEL_PATH] [CRITIC_MODEL_PATH] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT]
# Reads DATA/{prompts,eval} (DATA: DATA_DIR or OUTPUT/data); writes OUTPUT/step3_ppo (final/, critic/, samples.jsonl, eval.json).
# The settings: recipes/step3_ppo.yaml. Knobs overriding it: STEPS,
# GEN_BATCH, TRAIN_BATCH, ACTOR_LR, CRITIC_LR, KL, TARGET_KL, KL_HORIZON, TEMPERATURE, ANSWER_LEN,
# ACTOR_LORA_DIM, SHAPING (rule rewards added to the reward model's score, space-separated; "" = none; its
# weights are then 1 each unless SHAPING_WEIGHTS says otherwise), SHAPING_WEIGHTS, STOP_REPETITION and
# STOP_LENGTH_RATIO (stop when the held-out replies degenerate; 0 = off), EMA=1, HYBRID_ENGINE=1 (CUDA),
# DTYPE; FAST=1, NUM_GPUS, HOSTFILE, FORCE=1 (see common.sh).
# On a GPU with the base preset: DTYPE=bf16 HYBRID_ENGINE=1 GEN_BATCH=32 TRAIN_BATCH=16 bash training_scripts/step3.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${5:-$OUTPUT}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
ACTOR_MODEL_PATH="${1:-$OUTPUT/step1_sft/final}"
CRITIC_MODEL_PATH="${2:-$OUTPUT/step2_reward/final}"
ACTOR_ZERO_STAGE="${3:-${ACTOR_ZERO_STAGE:-0}}"
CRITIC_ZERO_STAGE="${4:-${CRITIC_ZERO_STAGE:-0}}"
RUN="$OUTPUT/step3_ppo"
STEPS_ARGS=()
EVAL_ARGS=()
if [ "$FAST" = "1" ]; then
    STEPS_ARGS=(--max_steps 6 --eval_interval 6 --save_interval 3 --eval_batches 1); EVAL_ARGS=(--num_prompts 16)
fi
DATA="$(data_dir)"
EXTRA=()
HELD_OUT="$DATA/eval/prompts.jsonl"  # data_process holds out prompts of the demo's or the user's rows
if [ -s "$HELD_OUT" ]; then EXTRA+=(--eval_prompts "$HELD_OUT"); fi
# other shaping functions than the recipe's: their weights are 1 each unless SHAPING_WEIGHTS is given
if [ -n "${SHAPING+set}" ] && [ -z "${SHAPING_WEIGHTS+set}" ]; then SHAPING_WEIGHTS=""; fi
knob max_steps STEPS; knob per_device_generation_batch_size GEN_BATCH; knob per_device_training_batch_size TRAIN_BATCH
knob actor_learning_rate ACTOR_LR; knob critic_learning_rate CRITIC_LR; knob init_kl_coef KL; knob target_kl TARGET_KL
knob kl_horizon KL_HORIZON; knob temperature TEMPERATURE; knob max_answer_seq_len ANSWER_LEN
knob actor_lora_dim ACTOR_LORA_DIM; knob shaping_funcs SHAPING; knob shaping_weights SHAPING_WEIGHTS
knob stop_repetition STOP_REPETITION; knob stop_length_ratio STOP_LENGTH_RATIO
knob enable_ema EMA; knob enable_hybrid_engine HYBRID_ENGINE; knob dtype DTYPE
launch "$REPO/step3_rlhf_ppo/main.py" --config "$RECIPES/step3_ppo.yaml" \
    --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
    --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
    --data_path "$DATA/prompts" \
    --actor_zero_stage "$ACTOR_ZERO_STAGE" \
    --critic_zero_stage "$CRITIC_ZERO_STAGE" \
    ${KNOBS[@]+"${KNOBS[@]}"} ${STEPS_ARGS[@]+"${STEPS_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} $(force_flag) \
    --output_dir "$RUN"
[ ! -s "$HELD_OUT" ] || up_to_date "$RUN/eval.json" "$RUN/done" "$ACTOR_MODEL_PATH/model.safetensors" || run "$PY" "$REPO/step3_rlhf_ppo/evaluate.py" \
    --policy "$RUN/final" --baseline "$ACTOR_MODEL_PATH" \
    --reward_model "$OUTPUT/step2_reward/final" --prompts "$HELD_OUT" --out "$RUN/eval.json" \
    ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"} $(judge_flag "$DATA")
