"""Talk to any model a step exported (SFT, PPO, DPO final/ dirs), or answer a file of prompts.

    python step1_pretrain_sft/chat.py --model OUT/step1_sft/final
        interactive: replies stream as they are generated; /reset clears the history, /exit (or EOF) quits
    python step1_pretrain_sft/chat.py --model DIR --prompts prompts.jsonl --out answers.jsonl --greedy
        batch: JSONL rows with a "prompt" field (other fields are copied through) or plain text with one
        prompt per line; writes the rows plus "response"

Generation is utils.generation (the code the SFT evaluation, serve.py and make_pairs.py use): prompts via
the tokenizer's chat template (ChatML for step0's), stop at the template's end-of-turn token or eos,
temperature/top-k/top-p/repetition penalty, seeded. Any local Hugging Face causal-LM dir with its tokenizer works.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from utils.chat import prompt_ids
from utils.config import option, parse_config, require
from utils.errors import UserError, main_guard
from utils.generation import CallbackStreamer, SamplingConfig, generate_ids, generate_replies
from utils.model import load_for_inference
from utils.tasks import read_jsonl


@dataclass
class ChatConfig:
    """Chat with an exported model, interactively or over a file of prompts."""

    model: str = option("", "Model dir exported by any step (its final/ dir).")
    system: str = option("", "Optional system message placed before the conversation.")
    temperature: float = option(0.7, "Sampling temperature (0 = greedy).")
    top_k: int = option(50, "Sample from the k most likely tokens (0 = no limit).")
    top_p: float = option(0.9, "Nucleus sampling threshold.")
    max_new_tokens: int = option(256, "Longest reply in tokens.")
    repetition_penalty: float = option(1.1, "Penalty > 1 discourages repeating tokens.")
    greedy: bool = option(False, "Greedy decoding (same as --temperature 0).")
    seed: int = option(0, "Sampling seed (each batch and each interactive turn reuses it).")
    prompts: str = option("", "Batch mode: JSONL with a 'prompt' field, or plain text with one prompt per line.")
    out: str = option("", "Batch mode: where to write the rows plus 'response' (JSONL).")
    batch_size: int = option(8, "Batch mode: prompts generated together.")

    def validate(self) -> None:
        require(bool(self.model), "model", self.model, "give a model dir exported by a step (OUT/step1_sft/final)")
        require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(bool(self.prompts) == bool(self.out), "out", self.out, "--prompts and --out go together")

    def sampling(self) -> SamplingConfig:
        temperature = 0.0 if self.greedy else self.temperature
        return SamplingConfig(self.max_new_tokens, temperature, self.top_k, self.top_p, self.repetition_penalty,
                              self.seed)


def read_prompts(path: str) -> list[dict]:
    """Rows with a 'prompt' from JSONL, or one prompt per non-empty line of a text file."""
    if not Path(path).is_file():
        raise UserError(f"--prompts {path}: file not found")
    if path.endswith(".jsonl"):
        rows = read_jsonl(path)
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"{path}:{i + 1}: needs a string field 'prompt'")
        return rows
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [{"prompt": line} for line in lines if line.strip()]


def conversation(cfg: ChatConfig, history: list[dict[str, str]], prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return system + history + [{"role": "user", "content": prompt}]


def answer_file(cfg: ChatConfig, model, tokenizer) -> None:
    rows = read_prompts(cfg.prompts)
    replies = generate_replies(model, tokenizer, [conversation(cfg, [], r["prompt"]) for r in rows], cfg.sampling(),
                               cfg.batch_size)
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, reply in zip(rows, replies, strict=True):
            f.write(json.dumps({**row, "response": reply}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"wrote {len(rows)} responses to {out}", file=sys.stderr)


def stream_reply(model, tokenizer, messages: list[dict[str, str]], sampling: SamplingConfig) -> str:
    """Generate one reply, printing it as it comes; returns the full text."""
    pieces: list[str] = []

    def show(text: str) -> None:
        pieces.append(text)
        print(text, end="", flush=True)

    # the streamer prints each piece from inside generate, so no second thread is needed
    generate_ids(model, tokenizer, [prompt_ids(tokenizer, messages)], sampling,
                 streamer=CallbackStreamer(tokenizer, show))
    print(flush=True)
    return "".join(pieces)


def interactive(cfg: ChatConfig, model, tokenizer) -> None:
    history: list[dict[str, str]] = []
    tty = sys.stdin.isatty()
    print("输入消息后回车；/reset 清空对话，/exit 退出。 (type a message; /reset, /exit)", flush=True)
    while True:
        try:
            line = input("你> " if tty else "")
        except EOFError:
            print(flush=True)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            print("(对话已清空 / history cleared)", flush=True)
            continue
        messages = conversation(cfg, history, text)
        print("助手> ", end="", flush=True)
        reply = stream_reply(model, tokenizer, messages, cfg.sampling())
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


@main_guard
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ChatConfig, argv, prog="step1_pretrain_sft/chat.py")
    model, tokenizer = load_for_inference(cfg.model)
    if cfg.prompts:
        answer_file(cfg, model, tokenizer)
    else:
        interactive(cfg, model, tokenizer)


if __name__ == "__main__":
    main()
