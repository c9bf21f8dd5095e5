# Sourced by every step script: repo paths, the Python to use, the launcher, and `run` (print, then exec).
# Knobs (environment): OUTPUT (default outputs/demo), NUM_GPUS (processes per node, default 1),
# HOSTFILE (DeepSpeed hostfile for multi-node), LAUNCHER=python to run without the deepspeed launcher,
# MASTER_PORT, FAST=1 (smoke-sized runs), FORCE=1 (redo finished steps).
# Your own data and model instead of the demo's (README, "Your own data and models"):
#   PRETRAIN_DATA, SFT_DATA, PREF_DATA, PROMPT_DATA  files or dirs (several: space-separated) that step0.sh's
#       data_process reads in place of the demo data (each row goes where its fields say; see docs/DATA.md)
#   DATA_COLUMNS  data_process --columns entries for them (space-separated, one per input or one for all)
#   DATA_DIR   a data dir data_process already built: every step reads it as it is (default OUTPUT/data)
#   BASE_MODEL a Hugging Face causal-LM dir to start SFT from, with its own tokenizer and chat template;
#              step 0's tokenizer and pretraining are skipped
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
OUTPUT="${OUTPUT:-$REPO/outputs/demo}"
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
NUM_GPUS="${NUM_GPUS:-1}"
FAST="${FAST:-0}"
export PYTHONUNBUFFERED=1
# Keep freed memory in the process instead of returning it to the kernel after every step: the large,
# short-lived activation tensors otherwise cost page faults each step (measured on the tiny-preset
# pretraining demo: a third of the CPU time in the kernel without it, ~2,500 -> ~4,100 tokens/s with it;
# it keeps more memory mapped). Set GLIBC_TUNABLES yourself to override.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"

# launch SCRIPT ARGS...: through the deepspeed launcher (as DeepSpeed-Chat does) unless LAUNCHER=python
launch() {
    local script="$1"; shift
    local cmd
    if [ "${LAUNCHER:-deepspeed}" = "python" ]; then
        cmd=("$PY" "$script" "$@")
    elif [ -n "${HOSTFILE:-}" ]; then
        cmd=("$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" "$script" "$@")
    else
        cmd=("$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" "$script" "$@")
    fi
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}"
}

# data_dir: the data_process output the steps read (DATA_DIR, else OUTPUT/data), as an absolute path
data_dir() {
    case "${DATA_DIR:-}" in "") echo "$OUTPUT/data" ;; /*) echo "$DATA_DIR" ;; *) echo "$PWD/$DATA_DIR" ;; esac
}

# judge_flag DATA: evaluate.py's --judge_data DATA where DATA holds the demo's sentiment items (the judge is
# fitted on its training reviews); nothing for data without them
judge_flag() {
    if [ -s "$1/eval/t1_sentiment.jsonl" ]; then echo "--judge_data $1"; fi
}

# The demo's settings of each step live in one file, training_scripts/recipes/<step>.yaml, passed as
# --config; the knobs below (environment variables) override single options of it, and flags given after
# --config win over it. `python STEP.py --config RECIPE --print_config` shows what a run resolves to.
RECIPES="$REPO/training_scripts/recipes"

# knob FLAG VAR: append "--FLAG <value of VAR>" to the KNOBS array when VAR is set in the environment (a list
# option takes a space-separated value; an empty one clears the list), so the recipe decides otherwise
KNOBS=()
knob() {
    local flag="$1" var="$2" values
    [ -n "${!var+set}" ] || return 0
    read -r -a values <<< "${!var}"
    if [ ${#values[@]} -eq 0 ]; then values=(""); fi
    KNOBS+=("--$flag" "${values[@]}")
}

# run_option RUN_DIR NAME: the value NAME had in a finished run (its config.json), so that an evaluation uses
# what the training used
run_option() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1/config.json" "$2"
}

# run ARGS...: print the resolved command, then run it
run() {
    echo "+ $*" >&2
    "$@"
}

# force_flag: --force when FORCE=1, so a finished step (done marker, same config) runs again
force_flag() {
    if [ "${FORCE:-0}" = "1" ]; then echo "--force"; fi
}

# up_to_date RESULT INPUT...: true when RESULT exists, is newer than every INPUT and FORCE is not 1, so an
# evaluation of a finished step is not redone on every run of the chain
up_to_date() {
    local result="$1"; shift
    [ "${FORCE:-0}" != "1" ] && [ -f "$result" ] || return 1
    local input
    for input in "$@"; do [ "$result" -nt "$input" ] || return 1; done
    echo "+ $result is up to date: skipped (FORCE=1 to redo)" >&2
}
