"""The shell scripts the README shows, run as a user runs them: `make demo`'s run_all.sh end to end at nano
size (every step script through the DeepSpeed launcher, the evaluations and the report card), then again,
when every finished step is skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, clean_env

STEPS = ("step1_pretrain", "step1_sft", "step2_reward", "step3_ppo", "step3_dpo", "step3_grpo")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all") / "demo"
    env = clean_env(FAST="1", PRESET="nano", DEMO_SCALE="0.03", VOCAB_SIZE="600", MASTER_PORT="29623",
                    PY=sys.executable)
    first = subprocess.run(["bash", str(REPO / "training_scripts" / "run_all.sh"), str(out)], cwd=out.parent,
                           env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    # again without the launcher: what is under test is that every finished step is skipped
    again = subprocess.run(["bash", str(REPO / "training_scripts" / "run_all.sh"), str(out)], cwd=out.parent,
                           env={**env, "LAUNCHER": "python"}, capture_output=True, text=True, timeout=600)
    return out, first, again


def test_run_all_runs_every_step_and_writes_the_report(smoke):
    out, first, _ = smoke
    # each step ran its recipe, with the knobs given in the environment over it
    pretrain = json.loads((out / "step1_pretrain" / "config.json").read_text())
    assert pretrain["preset"] == "nano" and pretrain["learning_rate"] == 2e-3 and pretrain["num_warmup_steps"] == 100
    assert json.loads((out / "step0" / "config.json").read_text())["vocab_size"] == 600
    ppo = json.loads((out / "step3_ppo" / "config.json").read_text())
    assert ppo["shaping_funcs"] == ["repetition", "min_length:40"] and ppo["shaping_weights"] == [2.0, 2.0] and ppo["max_steps"] == 6
    for step in STEPS:
        assert (out / step / "done").is_file() and (out / step / "final" / "config.json").is_file(), step
    launched = [ln for ln in first.stderr.splitlines() if ln.startswith("+ ") and "deepspeed.launcher.runner" in ln]
    assert len(launched) == len(STEPS)  # every training step went through DeepSpeed's launcher
    for step in ("step3_ppo", "step3_dpo", "step3_grpo"):  # the comparison with the SFT model
        assert 0 <= json.loads((out / step / "eval.json").read_text())["win_rate"] <= 1
    assert {"sentiment_acc", "ner_f1"} <= set(json.loads((out / "step3_grpo" / "tasks.json").read_text()))
    assert (out / "step2_reward" / "rw_eval.json").is_file()
    by_length = json.loads((out / "step2_reward" / "rw_eval_unmatched.json").read_text())["by_length"]
    assert sum(by_length[k]["pairs"] for k in ("chosen_longer", "similar", "chosen_shorter")) == len(
        (out / "data" / "eval" / "preference_unmatched.jsonl").read_text().splitlines()) > 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"## {name}" in report for name in ("Step 1: pretraining", "Step 1: supervised fine-tuning",
                                                   "Step 2: reward model", "Step 3: PPO", "Step 3: DPO",
                                                   "Step 3: GRPO (verifiable task rewards)"))
    assert f"Length (rw_eval.py on eval/preference_unmatched.jsonl, held-out pairs not matched by length): {by_length['verdict']}." in report
    assert (out / "report.html").is_file() and list((out / "report").glob("*.png"))


def test_run_all_again_skips_every_finished_step(smoke):
    out, _, again = smoke
    assert again.returncode == 0, again.stderr[-3000:]
    # data_process and step0 as well as the training steps
    assert again.stderr.count("already holds a finished run of this config: skipped") == len(STEPS) + 2
    assert "is up to date: skipped" in again.stderr  # the evaluations of finished steps too
    assert "train:" not in again.stderr and "ppo:" not in again.stderr  # no training step ran
