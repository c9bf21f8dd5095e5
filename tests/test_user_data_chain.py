"""The README's second way to use the toolkit, run as a user runs it: run_all.sh on files in public
corpora's schemas, without the demo data."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, clean_env

from data_process.example_corpora import main as example_corpora


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
    user_steps = ("step1_pretrain", "step1_sft", "step2_reward", "step3_ppo", "step3_dpo")  # the demo's minus GRPO
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
