"""Reliability (docs/RELIABILITY.md): SIGKILL at a random moment during SFT, reward-model training and DPO
resumes to the uninterrupted result; the catalogue of bad inputs, each one error line, exit 2 and nothing
written; a full disk while checkpointing. (Pretraining and PPO have their SIGKILL tests beside their
other command-line tests, in test_cli_and_resume.py and test_ppo.py.)"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PAIRS, REPO, clean_env, run_python, sigkill_and_rerun
from safetensors.torch import load_file

from testkit.chat_tokenizer import make_chat_tokenizer
from utils.log import read_metrics

TIMING = ("tok_per_s", "mfu")


@pytest.fixture(scope="module")
def inputs(chat_tokenizer, tmp_path_factory):
    """A nano causal LM and a reward model on it (with the tokenizer), an SFT .jsonl, a pairs .jsonl, a
    prompts .jsonl and a second, larger tokenizer."""
    from utils.model import create_causal_lm
    from utils.reward import create_reward_model

    root = tmp_path_factory.mktemp("reliability")
    create_causal_lm("nano", len(chat_tokenizer), 256, seed=0).save_pretrained(root / "lm")
    chat_tokenizer.save_pretrained(root / "lm")
    create_reward_model(root / "lm", chat_tokenizer.pad_token_id, seed=1).save_pretrained(root / "rm")
    chat_tokenizer.save_pretrained(root / "rm")
    write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": p},
                                                   {"role": "assistant", "content": c}]} for p, c, _, _ in PAIRS])
    write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r, "kind": k} for p, c, r, k in PAIRS])
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p, *_ in PAIRS])
    make_chat_tokenizer(root / "big_tokenizer", vocab=len(chat_tokenizer) + 100)
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# SIGKILL at a random moment, then the same command again

def step_command(step: str, root: Path, out: Path) -> list[str]:
    common = ["--output_dir", str(out), "--dtype", "fp32", "--enable_tensorboard", "false", "--max_steps", "36",
              "--save_interval", "4", "--eval_interval", "20", "--keep_last", "2", "--learning_rate", "3e-3",
              "--per_device_train_batch_size", "2", "--max_seq_len", "96"]
    if step == "sft":
        return ["step1_pretrain_sft/main.py", "--stage", "sft", "--model_name_or_path", str(root / "lm"),
                "--data_path", str(root / "sft.jsonl"), *common]
    script = {"rm": "step2_reward_model/main.py", "dpo": "step3_rlhf_ppo/dpo.py"}[step]
    return [script, "--model_name_or_path", str(root / "lm"), "--data_path", str(root / "pairs.jsonl"),
            "--eval_pairs", str(root / "pairs.jsonl"), *common]


@pytest.mark.parametrize("step", ["sft", "rm", "dpo"])
def test_sigkill_then_rerun_ends_where_an_uninterrupted_run_ends(inputs, tmp_path, step):
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_python(step_command(step, inputs, full), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r, when = sigkill_and_rerun(step_command(step, inputs, cut), cut)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr, when
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), when
    ma, mb = ([{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(d)] for d in (full, cut))
    assert ma == mb and len([m for m in ma if m["kind"] == "train"]) == 36, when


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written


def bad_cases(root: Path, tmp: Path) -> dict[str, tuple[str, list[str], str]]:
    """name -> (step, its arguments without --output_dir, what the error line must say)."""
    lm, rm = str(root / "lm"), str(root / "rm")
    sft = ["--stage", "sft", "--model_name_or_path", lm, "--max_seq_len", "96"]
    pairs = ["--model_name_or_path", lm, "--max_seq_len", "96"]
    bad_json = write_jsonl(tmp / "bad.jsonl", [{"messages": []}])
    bad_json.write_text(bad_json.read_text() + "{\"messages\": [oops\n", encoding="utf-8")
    (tmp / "empty.jsonl").write_text("")
    no_field = write_jsonl(tmp / "no_field.jsonl", [{"prompt": "你好", "response": "你好"}])
    no_rejected = write_jsonl(tmp / "no_rejected.jsonl", [{"prompt": "你好", "chosen": "好"}])
    long = "很长的问题" * 40
    long_sft = write_jsonl(tmp / "long_sft.jsonl", [{"messages": [{"role": "user", "content": "短"},
                                                                  {"role": "assistant", "content": "好"}]},
                                                    {"messages": [{"role": "user", "content": long},
                                                                  {"role": "assistant", "content": "好"}]}])
    long_pairs = write_jsonl(tmp / "long_pairs.jsonl", [{"prompt": long, "chosen": "好", "rejected": "差"}])
    long_prompts = write_jsonl(tmp / "long_prompts.jsonl", [{"prompt": "好"}, {"prompt": long}])
    pickled = tmp / "pickled"
    if (root / "lm").is_dir():
        shutil.copytree(root / "lm", pickled, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(load_file(root / "lm" / "model.safetensors"), pickled / "pytorch_model.bin")
    ppo = ["--actor_model_name_or_path", lm, "--critic_model_name_or_path", rm, "--data_path",
           str(root / "prompts.jsonl"), "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"]
    return {
        "missing data file": ("sft", [*sft, "--data_path", str(tmp / "nope.jsonl")], "not found"),
        "empty data file": ("sft", [*sft, "--data_path", str(tmp / "empty.jsonl")], "no 'train' rows"),
        "malformed JSONL at line N": ("sft", [*sft, "--data_path", str(bad_json)], "bad.jsonl:2: malformed JSON"),
        "missing field (SFT)": ("sft", [*sft, "--data_path", str(no_field)], "no 'messages' field"),
        "missing field (pairs)": ("rm", [*pairs, "--data_path", str(no_rejected)], "missing string field 'rejected'"),
        "missing prompts file": ("ppo", [*ppo[:4], "--data_path", str(tmp / "nope.jsonl")], "not found"),
        "too long, rejected (SFT)": ("sft", [*sft, "--data_path", str(long_sft), "--max_seq_len", "48",
                                             "--long_inputs", "reject"], "(train) row 2: "),
        "too long, rejected (RM)": ("rm", [*pairs, "--data_path", str(long_pairs), "--max_seq_len", "48",
                                           "--long_inputs", "reject"], "longer than --max_seq_len=48"),
        "too long, rejected (DPO)": ("dpo", [*pairs, "--data_path", str(long_pairs), "--max_seq_len", "48",
                                             "--long_inputs", "reject"], "longer than --max_seq_len=48"),
        "too long, rejected (PPO)": ("ppo", [*ppo[:4], "--data_path", str(long_prompts), "--max_prompt_seq_len", "32",
                                             "--long_inputs", "reject"], "row 2: "),
        "tokenizer larger than the model's vocab": ("sft", [*sft, "--data_path", str(root / "sft.jsonl"),
                                                            "--tokenizer_path", str(root / "big_tokenizer")],
                                                    "but the model's vocabulary is"),
        "reward model where a causal LM is expected (SFT)": ("sft", [*sft[:2], "--model_name_or_path", rm,
                                                                     "--data_path", str(root / "sft.jsonl")],
                                                             "needs a causal language model"),
        "pickled weights only": ("sft", [*sft[:2], "--model_name_or_path", str(pickled), "--data_path",
                                         str(root / "sft.jsonl")], "no .safetensors weights (only pytorch_model.bin)"),
        "reward model where a causal LM is expected (DPO)": ("dpo", ["--model_name_or_path", rm, "--data_path",
                                                                     str(root / "pairs.jsonl")],
                                                             "needs a causal language model"),
        "causal LM where a reward model is expected (PPO)": ("ppo", [*ppo, "--reward_model_name_or_path", lm],
                                                             "needs a reward model"),
        "offload without ZeRO": ("sft", [*sft, "--data_path", str(root / "sft.jsonl"), "--offload"],
                                 "needs ZeRO stage 1, 2 or 3"),
        "packing while pretraining": ("pretrain", ["--preset", "nano", "--data_path", str(tmp), "--packing"],
                                      "--packing"),
        "conversation weighting while pretraining": ("pretrain", ["--preset", "nano", "--data_path", str(tmp),
                                                                  "--loss_weighting", "conversation"],
                                                     "weighs SFT conversations"),
        "max_seq_len beyond the model's positions": ("sft", [*sft, "--data_path", str(root / "sft.jsonl"),
                                                             "--max_seq_len", "1024"], "256 positions"),
        "generation batch not divisible into mini-batches": ("ppo", [*ppo, "--per_device_training_batch_size", "3"],
                                                             "multiple of"),
        "reference offload without ZeRO-3": ("ppo", [*ppo, "--offload_reference_model"], "actor_zero_stage 3"),
        "fp16 on CPU": ("rm", [*pairs, "--data_path", str(root / "pairs.jsonl"), "--dtype", "fp16"],
                        "--dtype=fp16 is invalid on CPU"),
    }


MAINS = {"sft": "step1_pretrain_sft.main", "pretrain": "step1_pretrain_sft.main", "rm": "step2_reward_model.main",
         "dpo": "step3_rlhf_ppo.dpo", "ppo": "step3_rlhf_ppo.main"}


def _case_names() -> list[str]:
    """The catalogue's case names (bad_cases writes its small files into a throwaway dir here)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(bad_cases(Path(tmp), Path(tmp)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_line_exit_2_nothing_written(dist, inputs, tmp_path, capsys, case):
    import importlib

    step, args, expected = bad_cases(inputs, tmp_path)[case]
    if step == "pretrain":
        args = ["--stage", "pretrain", *args]
    out = tmp_path / "out"
    main = importlib.import_module(MAINS[step]).main
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output_dir", str(out), "--enable_tensorboard", "false"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_disk_full_while_checkpointing(token_dir, tmp_path):
    """A file-size limit (RLIMIT_FSIZE; writes past it fail with EFBIG as on a full disk) hit by the first
    checkpoint: one error line, exit 2, no half-written checkpoint or export; with room again the same
    command runs to the end."""
    out = tmp_path / "run"
    args = ["step1_pretrain_sft/main.py", "--stage", "pretrain", "--preset", "nano", "--data_path", str(token_dir),
            "--output_dir", str(out), "--max_seq_len", "64", "--dtype", "fp32", "--enable_tensorboard", "false",
            "--max_steps", "6", "--save_interval", "3"]

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                       timeout=300, preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "writing checkpoint step00000003 failed" in lines[0], r.stderr[-3000:]
    assert "free disk space" in lines[0] and "Traceback" not in r.stderr
    assert not list((out / "checkpoints").glob("*step*")) and not (out / "final").exists()
    assert not (out / "done").exists()
    r = run_python(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file() and (out / "done").is_file()


def test_no_remote_code_and_no_unpickling_in_the_sources():
    """Models load with trust_remote_code=False and from safetensors; nothing unpickles a user's file."""
    sources = [p for d in ("utils", "data_process", "step0_tokenizer", "step1_pretrain_sft", "step2_reward_model",
                           "step3_rlhf_ppo", "bench") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert "trust_remote_code=True" not in text, path
        assert "pickle.load" not in text, path
        for call in text.split("torch.load(")[1:]:
            assert "weights_only=True" in call.split(")")[0], path
    loaders = (REPO / "utils" / "model.py").read_text() + (REPO / "utils" / "reward.py").read_text()
    assert loaders.count("trust_remote_code=False") >= 3 and loaders.count("use_safetensors=True") >= 2
