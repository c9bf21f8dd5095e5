"""The entry points as a user meets them before a run: every step's recipe (training_scripts/recipes) read
whole by its step, --print_config, and --help of every Python entry point from another directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, clean_env

ENTRY_POINTS = ("data_process/main.py", "data_process/make_pairs.py", "step0_tokenizer/main.py",
                "step1_pretrain_sft/main.py", "step1_pretrain_sft/chat.py", "step1_pretrain_sft/serve.py",
                "step1_pretrain_sft/score_tasks.py", "step2_reward_model/main.py", "step2_reward_model/rw_eval.py",
                "step3_rlhf_ppo/main.py", "step3_rlhf_ppo/dpo.py", "step3_rlhf_ppo/grpo.py",
                "step3_rlhf_ppo/evaluate.py")


RECIPES = {"step0_tokenizer": ("step0_tokenizer.main", "TokenizerConfig"),
           "step1_pretrain": ("step1_pretrain_sft.main", "Step1Config"),
           "step1_sft": ("step1_pretrain_sft.main", "Step1Config"),
           "step2_reward": ("step2_reward_model.main", "Step2Config"),
           "step3_ppo": ("step3_rlhf_ppo.main", "PPOConfig"), "step3_dpo": ("step3_rlhf_ppo.dpo", "DPOConfig"),
           "step3_grpo": ("step3_rlhf_ppo.grpo", "GRPOConfig")}


def resolved(module: str, cls: str, argv: list[str], capsys) -> dict:
    """What `python STEP.py ARGV --print_config` prints, parsed (in-process)."""
    import importlib

    import yaml

    from utils.config import parse_config

    with pytest.raises(SystemExit) as stop:
        parse_config(getattr(importlib.import_module(module), cls), [*argv, "--print_config"])
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_recipe_is_read_whole_by_its_step(capsys):
    """Each recipe names only options of its step, and each of its values reaches the resolved config."""
    import yaml

    recipes = REPO / "training_scripts" / "recipes"
    assert {p.stem for p in recipes.glob("*.yaml")} == set(RECIPES)
    for name, (module, cls) in RECIPES.items():
        recipe = yaml.safe_load((recipes / f"{name}.yaml").read_text(encoding="utf-8"))
        config = resolved(module, cls, ["--config", str(recipes / f"{name}.yaml")], capsys)
        for key, value in recipe.items():  # YAML reads 2 as an int where the option is a float: compare values
            assert config[key] == value, (name, key, config[key], value)


def test_print_config_shows_the_recipe_under_the_flags(capsys):
    recipe = REPO / "training_scripts" / "recipes" / "step3_dpo.yaml"
    config = resolved("step3_rlhf_ppo.dpo", "DPOConfig", ["--config", str(recipe), "--beta", "0.3"], capsys)
    assert config["beta"] == 0.3 and config["rpo_alpha"] == 0.5 and config["learning_rate"] == 5e-5
    assert config["weight_decay"] == 0.0  # the recipe's, not the CLI default 0.1


def test_every_entry_point_answers_help_from_any_directory(tmp_path):
    # all at once: each start is mostly importing torch, which two cores do twice as fast side by side
    procs = {script: subprocess.Popen([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, env=clean_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script in ENTRY_POINTS}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, f"{script}: {err[-1000:]}"


def test_gpu_check_says_no_gpu_in_one_line_and_runs_nothing(tmp_path):
    """On a machine without CUDA, bench/gpu_check.sh prints one line and exits 0 before it writes anything."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                          env={**clean_env(), "PY": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        f"gpu_check: no CUDA GPU visible to {sys.executable} (torch.cuda.is_available() is not True): nothing run"]
    assert not out.exists()
