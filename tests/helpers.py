"""Small builders shared by the tests: learnable token files and launcher-free run commands."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_token_dir(path: Path, vocab: int = 128, n_train: int = 40_000, n_valid: int = 4_000, seed: int = 0) -> Path:
    """A step0-style tokens/ dir whose text is learnable: runs of counting sequences with random starts
    and strides, separated by EOS (id 1), so a nano model's loss falls within a few dozen steps."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)

    def stream(n: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < n:
            start, stride, length = rng.integers(2, vocab), rng.integers(1, 4), rng.integers(8, 40)
            out.extend(((start + stride * np.arange(length)) % (vocab - 2) + 2).tolist())
            out.append(1)
        return np.array(out[:n], dtype=np.uint16)

    train, valid = stream(n_train), stream(n_valid)
    train.tofile(path / "train.bin")
    valid.tofile(path / "validation.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab, "eos_token_id": 1,
            "num_tokens": {"train": n_train, "validation": n_valid},
            "num_chars": {"train": 2 * n_train, "validation": 2 * n_valid}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child training process: no inherited launcher variables, 1 thread each
    when two processes share the two cores."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(extra)
    return env


def run_python(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def sigkill_and_rerun(args: list[str], out: Path, after: int = 4, until: int = 20,
                      ) -> tuple[subprocess.CompletedProcess, str]:
    """Start `python args` (saving a checkpoint every `after` steps), SIGKILL it at a random moment
    between the appearance of checkpoint `after` and that of checkpoint `until` (step numbers), then run
    the same command again to the end. Returns that second run and a description of the moment, for
    assertion messages. The random delay after a checkpoint is cut short when the next one appears, so a
    nano run that takes less than the delay for its last steps is still killed mid-run."""
    rng = random.Random()
    start_at = rng.randrange(after, until, after)
    delay = rng.uniform(0.0, 0.3)
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker, next_marker = (out / "checkpoints" / f"step{s:08d}" for s in (start_at, start_at + after))
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    seen = time.time()
    while time.time() - seen < delay and not next_marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    waited = time.time() - seen
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    when = f"killed {waited:.3f} s after {marker.name} appeared"
    assert not (out / "done").exists(), f"the run finished before it could be killed ({when})"
    return run_python(args, timeout=300), when


# preference pairs small enough for nano models to learn: (prompt, chosen, rejected, kind)
PAIRS = [
    ("评价一下这家酒店。", "房间干净，服务热情，下次还住。", "房间很脏，服务差，再也不来了。", "review_sentiment"),
    ("写一条关于这本书的评论。", "内容精彩，值得一读。", "内容空洞，浪费时间。", "review_sentiment"),
    ("说说你对这台笔记本电脑的看法。", "速度快，屏幕清楚。", "卡顿严重，屏幕发黄。", "review_sentiment"),
    ("评价一下这家酒店。", "早餐丰富，位置方便。", "早餐难吃，位置偏僻。", "review_sentiment"),
    ("判断下面这条评论的情感倾向，只回答“正面”或“负面”。\n评论：很好", "正面", "负面", "corrupted_answer"),
    ("判断下面这条评论的情感倾向，只回答“正面”或“负面”。\n评论：太差", "负面", "正面", "corrupted_answer"),
    ("请对下面的句子进行分词，词与词之间用一个空格隔开。\n句子：我爱北京", "我 爱 北京", "我爱 北京", "corrupted_answer"),
    ("请对下面的句子进行分词，词与词之间用一个空格隔开。\n句子：今天很好", "今天 很 好", "今 天很 好", "corrupted_answer"),
]


# ----------------------------------------------------------------------------------------------------
# The two invariances every RL path (PPO, GRPO) is held to, through its real command line

RL_TIMING = ("tok_per_s", "gen_share", "experience_seconds", "train_seconds", "step_seconds")


def untimed_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run without its wall-clock figures (throughput, shares, time_* parts)."""
    from utils.log import read_metrics

    return [{k: v for k, v in m.items() if k not in RL_TIMING and not k.startswith("time_")}
            for m in read_metrics(run_dir)]


def _weights(run_dir: Path, sub: str) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / sub / "model.safetensors")


def assert_rl_resume_is_bit_exact(script: str, args: list[str], tmp_path: Path, steps: int,
                                  exports: tuple[str, ...]) -> list[dict]:
    """`script args --output_dir D` run whole, and killed with SIGKILL after a checkpoint (saved every 2
    steps) that leaves at least 2 more steps to run (a nano run finishes its last steps in a blink), then
    run again: the same exports bit for bit, the same metrics (wall-clock figures
    aside) and samples.jsonl. Returns the metrics."""
    import torch

    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_python([script, *args, "--output_dir", str(full)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r, when = sigkill_and_rerun([script, *args, "--output_dir", str(cut)], cut, after=2, until=steps - 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr, when
    for sub in exports:
        wa, wb = _weights(full, sub), _weights(cut, sub)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{sub} ({when})"
    ma, mb = untimed_metrics(full), untimed_metrics(cut)
    assert ma == mb and len([m for m in ma if m["kind"] == "train"]) == steps, when
    assert (full / "samples.jsonl").read_text() == (cut / "samples.jsonl").read_text(), when
    return ma


def assert_two_processes_match_one(script: str, one_args: list[str], two_args: list[str], tmp_path: Path,
                                   port: int, exports: tuple[str, ...]) -> None:
    """`script one_args` in one process and `deepspeed --num_gpus 2 script two_args` (its per-rank batch
    options halved by the caller) log the same metrics (to float summation order) and export the same
    weights."""
    import pytest

    one, two = tmp_path / "one", tmp_path / "two"
    r = run_python([script, *one_args, "--output_dir", str(one)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), script,
           *two_args, "--output_dir", str(two)]
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    a, b = untimed_metrics(one), untimed_metrics(two)
    assert [m["kind"] for m in a] == [m["kind"] for m in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert x.get("tokens") == y.get("tokens") and x.get("response_length") == y.get("response_length")
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for sub in exports:
        wa, wb = _weights(one, sub), _weights(two, sub)
        diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert diff < 1e-5, (sub, diff)


def without_output_dir(args: list[str]) -> list[str]:
    """A command line with its --output_dir and value taken out (the checks above add their own)."""
    if "--output_dir" not in args:
        return list(args)
    i = args.index("--output_dir")
    return args[:i] + args[i + 2:]


def ragged_mask(lengths: list[int], width: int):
    """(B, width) float mask with row b's first lengths[b] entries 1 (reply tokens first, then padding)."""
    import torch

    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def nano_sft_dir(root: Path, tokenizer) -> Path:
    """root/sft: a nano causal LM sized to `tokenizer` (seed 0) and the tokenizer, in an SFT export's format."""
    from utils.model import create_causal_lm

    create_causal_lm("nano", len(tokenizer), 256, seed=0).save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    return root / "sft"
