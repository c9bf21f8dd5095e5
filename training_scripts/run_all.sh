#!/usr/bin/env bash
# The whole chain on the built-in Chinese demo data, one step after another:
#   data + tokenizer -> pretrain -> SFT -> reward model -> DPO -> PPO
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
bash "$HERE/step3_dpo.sh" "$OUTPUT"          # DPO, then DPO vs SFT under the reward model

# Steps not built yet: say so and fail, rather than pretend the chain is complete.
MISSING=()
[ -f "$HERE/step3.sh" ] || MISSING+=("step3 PPO (training_scripts/step3.sh)")
if [ ${#MISSING[@]} -gt 0 ]; then
    echo "run_all: the chain stops here; not implemented yet:" >&2
    printf '  - %s\n' "${MISSING[@]}" >&2
    exit 1
fi
bash "$HERE/step3.sh" "$OUTPUT"
