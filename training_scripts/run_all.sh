#!/usr/bin/env bash
# The whole chain on the built-in Chinese demo data, one step after another:
#   data + tokenizer -> pretrain -> SFT -> reward model -> PPO -> DPO
#   bash training_scripts/run_all.sh [OUTPUT]          (make demo; FAST=1 for a smoke-sized run)
# Finished steps (done marker with the same config) are skipped unless FORCE=1; an interrupted step
# resumes from its last checkpoint when run again.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
OUTPUT="${1:-$OUTPUT}"
HERE="$REPO/training_scripts"
if [ "$FAST" = "1" ]; then export DEMO_SCALE="${DEMO_SCALE:-0.1}"; fi

bash "$HERE/step0.sh" "$OUTPUT"              # data_process + SentencePiece tokenizer + packed tokens
bash "$HERE/step1_pretrain.sh" "$OUTPUT"     # pretraining from scratch
bash "$HERE/step1_sft.sh" "$OUTPUT"          # supervised fine-tuning (ChatML)
bash "$HERE/step2.sh" "$OUTPUT"              # reward model + rw_eval on the held-out pairs
OUTPUT="$OUTPUT" bash "$HERE/step3.sh"         # PPO (actor, critic, reference, reward), then PPO vs SFT
bash "$HERE/step3_dpo.sh" "$OUTPUT"          # DPO, then DPO vs SFT under the reward model

# the report card: OUTPUT/report.md and report.html, rebuilt from the steps' outputs
run "$PY" -m utils.report "$OUTPUT"
