"""Through the real command line: bad values exit 2 with one line, 2 processes == 1 process,
and a run killed with SIGKILL resumes to exactly the uninterrupted result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, clean_env, run_python
from safetensors.torch import load_file

from utils.log import read_metrics

MAIN = "step1_pretrain_sft/main.py"


def base_args(token_dir: Path, out: Path) -> list[str]:
    return ["--preset", "nano", "--data_path", str(token_dir), "--output_dir", str(out), "--max_seq_len", "64",
            "--learning_rate", "3e-3", "--dtype", "fp32", "--enable_tensorboard", "false"]


@pytest.mark.parametrize("flag,value,expected,subprocess_run", [
    ("--learning_rate", "-0.1", "--learning_rate=-0.1 is invalid: must be > 0", True),
    ("--per_device_train_batch_size", "0", "--per_device_train_batch_size=0 is invalid", False),
    ("--preset", "huge", "--preset='huge' is invalid: choose one of nano, tiny, small, base", False),
    ("--zero_stage", "5", "--zero_stage=5 is invalid: choose one of 0, 1, 2, 3", False),
    ("--max_steps", "ten", "--max_steps='ten' is not a valid int", False),
])
def test_bad_value_one_line_exit_2(token_dir, tmp_path, capsys, flag, value, expected, subprocess_run):
    """Exactly one line on stderr, exit 2, nothing written: through the real command line once (no
    traceback, no logging before the error), in this process for the other values."""
    from step1_pretrain_sft.main import main as step1_main

    out = tmp_path / "run"
    args = [a for a in base_args(token_dir, out) if a not in ("--preset", "nano")]
    if flag != "--preset":
        args += ["--preset", "nano"]
    if subprocess_run:
        result = run_python([MAIN, *args, flag, value], timeout=120)
        code, stderr = result.returncode, result.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            step1_main([*args, flag, value])
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert not out.exists()  # nothing written


def test_unwritable_output_dir(token_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_python([MAIN, *base_args(token_dir, blocker / "run")], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0] and str(blocker) in lines[0], result.stderr


def test_missing_token_dir(tmp_path):
    result = run_python([MAIN, *base_args(tmp_path / "nope", tmp_path / "run")], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "step0" in result.stderr


def test_two_processes_match_one(token_dir, tmp_path):
    """deepspeed --num_gpus 2 on CPU (gloo), micro batch 4 each == 1 process with micro batch 8."""
    one = tmp_path / "one"
    r = run_python([MAIN, *base_args(token_dir, one), "--max_steps", "8", "--zero_stage", "2",
                    "--per_device_train_batch_size", "8"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29611", MAIN,
           *base_args(token_dir, two), "--max_steps", "8", "--zero_stage", "2", "--per_device_train_batch_size", "4"]
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a, b = read_metrics(one, "train"), read_metrics(two, "train")
    assert len(a) == len(b) == 8
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) < 1e-5
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    # the same up to float summation order, which Adam's normalised steps carry into the weights at ~1e-5
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_sigkill_then_resume_is_bit_exact(token_dir, tmp_path):
    steps = ["--max_steps", "60", "--save_interval", "10", "--eval_interval", "20", "--keep_last", "2"]
    full = tmp_path / "full"
    r = run_python([MAIN, *base_args(token_dir, full), *steps], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, MAIN, *base_args(token_dir, cut), *steps], cwd=REPO,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step00000030").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "done").exists(), "the run finished before it could be killed"
    # a checkpoint cut off mid-write is present too: it must be skipped
    partial = cut / "checkpoints" / "tmp-step00000999"
    partial.mkdir(exist_ok=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    r = run_python([MAIN, *base_args(token_dir, cut), *steps], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "cut off mid-write" in r.stderr
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    ma, mb = read_metrics(full), read_metrics(cut)
    strip = ("tok_per_s", "mfu")
    assert [{k: v for k, v in m.items() if k not in strip} for m in ma] == \
           [{k: v for k, v in m.items() if k not in strip} for m in mb]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_launcher_from_inside_the_step_folder(token_dir, tmp_path):
    """`cd step1_pretrain_sft && deepspeed --num_gpus 1 main.py ...`, as DeepSpeed-Chat users run it."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", "29613", "main.py",
           *base_args(token_dir, tmp_path / "run"), "--max_steps", "2"]
    r = subprocess.run(cmd, cwd=REPO / "step1_pretrain_sft", env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert len(read_metrics(tmp_path / "run", "train")) == 2
    assert (tmp_path / "run" / "final" / "config.json").is_file()
