#!/usr/bin/env bash
# The whole chain, one step after another:
#   data + tokenizer -> pretrain -> SFT -> reward model -> PPO -> DPO -> GRPO (verifiable task rewards)
#   bash training_scripts/run_all.sh [OUTPUT]          (make demo; FAST=1 for a smoke-sized run)
# On the built-in Chinese demo data by default; on your own files with PRETRAIN_DATA / SFT_DATA / PREF_DATA /
# PROMPT_DATA (or a built DATA_DIR), and from an existing Hugging Face model with BASE_MODEL (no tokenizer
# training, no pretraining); see common.sh. Without preference pairs the chain ends after SFT.
# Finished steps (done marker with the same config) are skipped unless FORCE=1; an interrupted step
# resumes from its last checkpoint when run again.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
export OUTPUT
HERE="$REPO/training_scripts"
if [ "$FAST" = "1" ]; then export DEMO_SCALE="${DEMO_SCALE:-0.1}"; fi

bash "$HERE/step0.sh" "$OUTPUT"              # data_process + SentencePiece tokenizer + packed tokens
if [ -z "${BASE_MODEL:-}" ]; then
    bash "$HERE/step1_pretrain.sh" "$OUTPUT" # pretraining from scratch
fi
bash "$HERE/step1_sft.sh" "$OUTPUT"          # supervised fine-tuning (the tokenizer's chat template)
if [ -f "$(data_dir)/preference/dataset_dict.json" ]; then
    bash "$HERE/step2.sh" "$OUTPUT"          # reward model + rw_eval on the held-out pairs
    bash "$HERE/step3.sh"                    # PPO (actor, critic, reference, reward), then PPO vs SFT
    bash "$HERE/step3_dpo.sh" "$OUTPUT"      # DPO, then DPO vs SFT under the reward model
else
    echo "+ no preference pairs in $(data_dir)/preference: reward model, PPO and DPO skipped" >&2
fi
if [ -f "$(data_dir)/rl/dataset_dict.json" ]; then
    bash "$HERE/step3_grpo.sh" "" "" "$OUTPUT"  # GRPO on the verifiable task items, then their held-out scores
fi

# the report card: OUTPUT/report.md and report.html, rebuilt from the steps' outputs
run "$PY" -m utils.report "$OUTPUT"
