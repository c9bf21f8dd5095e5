"""The shell scripts the README shows, run as a user runs them: `make demo`'s run_all.sh end to end at nano
size (every step script through the DeepSpeed launcher, the evaluations and the report card), then again,
when every finished step is skipped; and `--help` of every Python entry point from another directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, clean_env

from data_process.example_corpora import main as example_corpora

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
    for step in STEPS:
        assert (out / step / "done").is_file() and (out / step / "final" / "config.json").is_file(), step
    launched = [ln for ln in first.stderr.splitlines() if ln.startswith("+ ") and "deepspeed.launcher.runner" in ln]
    assert len(launched) == len(STEPS)  # every training step went through DeepSpeed's launcher
    for step in ("step3_ppo", "step3_dpo", "step3_grpo"):  # the comparison with the SFT model
        assert 0 <= json.loads((out / step / "eval.json").read_text())["win_rate"] <= 1
    assert {"sentiment_acc", "ner_f1"} <= set(json.loads((out / "step3_grpo" / "tasks.json").read_text()))
    assert (out / "step2_reward" / "rw_eval.json").is_file()
    report = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"## {name}" in report for name in ("Step 1: pretraining", "Step 1: supervised fine-tuning",
                                                   "Step 2: reward model", "Step 3: PPO", "Step 3: DPO",
                                                   "Step 3: GRPO (verifiable task rewards)"))
    assert (out / "report.html").is_file() and list((out / "report").glob("*.png"))


def test_run_all_again_skips_every_finished_step(smoke):
    out, _, again = smoke
    assert again.returncode == 0, again.stderr[-3000:]
    # data_process and step0 as well as the training steps
    assert again.stderr.count("already holds a finished run of this config: skipped") == len(STEPS) + 2
    assert "is up to date: skipped" in again.stderr  # the evaluations of finished steps too
    assert "train:" not in again.stderr and "ppo:" not in again.stderr  # no training step ran


ENTRY_POINTS = ("data_process/main.py", "data_process/make_pairs.py", "step0_tokenizer/main.py",
                "step1_pretrain_sft/main.py", "step1_pretrain_sft/chat.py", "step1_pretrain_sft/serve.py",
                "step1_pretrain_sft/score_tasks.py", "step2_reward_model/main.py", "step2_reward_model/rw_eval.py",
                "step3_rlhf_ppo/main.py", "step3_rlhf_ppo/dpo.py", "step3_rlhf_ppo/grpo.py",
                "step3_rlhf_ppo/evaluate.py")


def test_every_entry_point_answers_help_from_any_directory(tmp_path):
    # all at once: each start is mostly importing torch, which two cores do twice as fast side by side
    procs = {script: subprocess.Popen([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, env=clean_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script in ENTRY_POINTS}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, f"{script}: {err[-1000:]}"


def test_run_all_on_user_files_only(tmp_path):
    """The chain on files in public corpora's schemas (wikiextractor, webtext2019zh, HF conversational
    preference; no demo data, no task evals, no RL task rows): every step trains, evaluates on what
    data_process held out of the user's rows, and the report card is written. One process per step without
    the launcher (the demo smoke run above goes through it)."""
    out = tmp_path / "mine"
    files = example_corpora(["--out", str(tmp_path / "corpora")])  # the README's worked example
    env = clean_env(FAST="1", PRESET="nano", VOCAB_SIZE="600", MASTER_PORT="29627", PY=sys.executable,
                    LAUNCHER="python", PRETRAIN_DATA=str(files["pretrain"]), SFT_DATA=str(files["sft"]),
                    PREF_DATA=str(files["preference"]))
    proc = subprocess.run(["bash", str(REPO / "training_scripts" / "run_all.sh"), str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((out / "data" / "stats.json").read_text())
    assert data["source"] == "user" and data["pretrain"]["train"] > 500
    assert not list((out / "data" / "eval").glob("t*_*.jsonl"))  # no demo task evals
    user_steps = [step for step in STEPS if step != "step3_grpo"]
    scripts = ("step1_pretrain_sft/main.py", "step2_reward_model/main.py", "step3_rlhf_ppo/main.py",
               "step3_rlhf_ppo/dpo.py")
    launched = [ln for ln in proc.stderr.splitlines() if ln.startswith("+ ") and any(s in ln for s in scripts)]
    assert len(launched) == len(user_steps) and not (out / "step3_grpo").exists()  # no RL task rows: no GRPO
    for step in user_steps:
        assert (out / step / "done").is_file(), step
    sft_evals = [json.loads(ln) for ln in (out / "step1_sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in sft_evals) and not any("sentiment_acc" in m for m in sft_evals)
    rw = json.loads((out / "step2_reward" / "rw_eval.json").read_text())
    assert rw["pairs"] > 0 and 0 <= rw["by_kind"]["all"]["accuracy"] <= 1  # pairs held out of the user's rows
    for step in ("step3_ppo", "step3_dpo"):  # against SFT on prompts held out of the user's rows
        assert 0 <= json.loads((out / step / "eval.json").read_text())["win_rate"] <= 1
    assert "## Step 3: DPO" in (out / "report.md").read_text(encoding="utf-8")
