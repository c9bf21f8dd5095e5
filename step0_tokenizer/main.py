"""Step 0: train the tokenizer on the cleaned pretraining text and pack that text into token files.

    python step0_tokenizer/main.py --data_path outputs/demo/data --output_dir outputs/demo/step0
    python step0_tokenizer/main.py --data_path DATA --output_dir OUT --vocab_size 32000   # a real corpus

1. SentencePiece BPE on the pretrain train split (documents sampled by hash beyond --max_train_chars):
   byte_fallback (no text is ever unknown), digits split, special tokens <|endoftext|> <|im_start|>
   <|im_end|> <|pad|> at ids 1-4, no normalisation, so decode(encode(x)) == x.
2. Its Hugging Face fast twin (step0_tokenizer/spm.py), checked id for id against SentencePiece on
   validation documents, saved to OUTPUT/tokenizer/ with the ChatML chat template and the .model file.
3. Packing: train and validation splits tokenized with datasets.map(num_proc), each document followed by
   <|endoftext|>, into OUTPUT/tokens/{train,validation}.bin (uint16 when the vocab fits) + meta.json.
stats.json reports characters per token and character coverage. Output is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import sentencepiece as spm

from data_process.output import atomic_output_dir, setup_logging, write_json
from data_process.text import unit_fraction
from step0_tokenizer.pack import pack_split, token_dtype
from step0_tokenizer.spm import (
    EOT,
    NUM_BYTE_PIECES,
    SPACE,
    SPECIAL_TOKENS,
    fast_tokenizer_from_sp,
    min_vocab_size,
    train_sentencepiece,
)
from utils.config import option, parse_config, require, save_config
from utils.errors import UserError, main_guard
from utils.run import DONE, already_done, done_payload

log = logging.getLogger("step0_tokenizer")

SPLITS = ("train", "validation")


@dataclass
class TokenizerConfig:
    """Train a SentencePiece BPE tokenizer, export it as a Hugging Face tokenizer, pack the pretraining text."""

    data_path: str = option("", "data_process output dir (its pretrain/ is used) or a pretrain DatasetDict dir.")
    output_dir: str = option("", "Where tokenizer/, tokens/, stats.json and config.json are written.")
    vocab_size: int = option(8000, "Vocabulary size (8000 suits the ~2 M character demo; 32000 for a "
                                   "corpus of 1 GB or more).")
    character_coverage: float = option(0.9995, "Share of training characters that get their own piece "
                                               "(the rest fall back to bytes); SentencePiece needs >= 0.98.")
    max_piece_length: int = option(16, "Longest piece in characters; 1 = a character-level vocabulary "
                                       "(then --vocab_size only needs to cover the characters).")
    max_train_chars: int = option(50_000_000, "Train the tokenizer on at most about this many characters "
                                              "(documents sampled by hash).")
    num_proc: int = option(min(4, os.cpu_count() or 1), "Processes for tokenizing the pretraining text.")
    num_threads: int = option(os.cpu_count() or 1, "SentencePiece training threads.")
    verify_docs: int = option(2000, "Validation documents checked for equal SentencePiece/HF ids and an "
                                    "exact round trip (0 = skip).")
    seed: int = option(1234, "Seed of the training-text sample and of SentencePiece.")
    force: bool = option(False, "Build again even if output_dir holds a finished run of this config and inputs.")

    def validate(self) -> None:
        require(bool(self.data_path), "data_path", self.data_path, "give the data_process output dir")
        require(bool(self.output_dir), "output_dir", self.output_dir, "give a directory to write to")
        require(min_vocab_size() <= self.vocab_size <= 1 << 32, "vocab_size", self.vocab_size,
                f"must be at least {min_vocab_size()} (specials + 256 bytes + merges)")
        require(0.98 <= self.character_coverage <= 1, "character_coverage", self.character_coverage,
                "must be in [0.98, 1]")
        require(1 <= self.max_piece_length <= 16, "max_piece_length", self.max_piece_length, "must be in [1, 16]")
        require(self.max_train_chars >= 1000, "max_train_chars", self.max_train_chars, "must be >= 1000")
        require(self.num_proc >= 1, "num_proc", self.num_proc, "must be >= 1")
        require(self.num_threads >= 1, "num_threads", self.num_threads, "must be >= 1")
        require(self.verify_docs >= 0, "verify_docs", self.verify_docs, "must be >= 0")


def load_pretrain(data_path: str) -> datasets.DatasetDict:
    """The pretrain DatasetDict (splits train and validation, column text) under `data_path`."""
    root = Path(data_path).expanduser()
    path = root / "pretrain" if (root / "pretrain" / "dataset_dict.json").is_file() else root
    if not (path / "dataset_dict.json").is_file():
        raise UserError(f"--data_path {root}: no pretrain dataset there (expected {root}/pretrain/"
                        "dataset_dict.json); run data_process/main.py first")
    data = datasets.load_from_disk(str(path))
    for split in SPLITS:
        if split not in data or "text" not in data[split].column_names:
            raise UserError(f"--data_path {path}: needs splits {SPLITS} with a 'text' column "
                            f"(found {dict((k, v.column_names) for k, v in data.items())})")
    if len(data["train"]) == 0:
        raise UserError(f"--data_path {path}: the train split is empty; give data_process more text")
    return data


def training_text(train: datasets.Dataset, max_chars: int, seed: int) -> tuple[list[str], Counter[str]]:
    """Lines of the documents sampled for tokenizer training, and their character counts."""
    texts = train["text"]
    total = sum(len(t) for t in texts)
    keep = min(1.0, max_chars / total)
    lines = [line for t in texts if keep >= 1 or unit_fraction(seed, t) < keep for line in t.split("\n") if line]
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line)
    log.info("tokenizer training text: %d lines, %d characters (%.0f%% of %d)", len(lines),
             sum(counts.values()), 100 * keep, total)
    return lines, counts


def verify(sp: spm.SentencePieceProcessor, tokenizer, texts: list[str]) -> None:
    """SentencePiece and the HF tokenizer give the same ids, and decoding restores every text exactly."""
    ours = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, theirs, mine in zip(texts, sp.encode(texts), ours, strict=True):
        if theirs != mine or tokenizer.decode(mine) != text:
            raise RuntimeError(f"tokenizer export mismatch on {text[:60]!r}: sentencepiece {theirs[:20]} "
                               f"vs HF {mine[:20]}")
    log.info("HF ids == SentencePiece ids and exact round trip on %d documents", len(texts))


def coverage(texts: list[str], vocab: dict[str, int]) -> float:
    """Share of the characters of `texts` that have their own piece (the rest are byte-encoded)."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(t)
    covered = sum(n for ch, n in counts.items() if (SPACE if ch == " " else ch) in vocab)
    return covered / max(1, sum(counts.values()))


@main_guard
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(TokenizerConfig, argv, prog="step0_tokenizer/main.py")
    if already_done(cfg.output_dir, cfg):
        return
    data = load_pretrain(cfg.data_path)
    lines, char_counts = training_text(data["train"], cfg.max_train_chars, cfg.seed)
    with atomic_output_dir(cfg.output_dir) as tmp:
        model = train_sentencepiece(lines, char_counts, tmp / "spm", cfg.vocab_size, cfg.character_coverage,
                                    cfg.num_threads, cfg.seed, cfg.max_piece_length)
        tokenizer = fast_tokenizer_from_sp(model)
        tok_dir = tmp / "tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        os.replace(model, tok_dir / "spm.model")
        Path(f"{tmp / 'spm'}.vocab").unlink()
        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
        validation = data["validation"]["text"]
        verify(sp, tokenizer, list(validation[:cfg.verify_docs]) + list(SPECIAL_TOKENS))

        dtype = token_dtype(len(tokenizer))
        eos_id = tokenizer.convert_tokens_to_ids(EOT)
        first_byte = sp.piece_to_id("<0x00>")
        (tmp / "tokens").mkdir()
        packed = {split: pack_split(data[split], tok_dir / "tokenizer.json", eos_id, tmp / "tokens" / f"{split}.bin",
                                    dtype, cfg.num_proc, tmp / ".cache", range(first_byte, first_byte + NUM_BYTE_PIECES))
                  for split in SPLITS}
        shutil.rmtree(tmp / ".cache")
        meta = {"dtype": dtype.name, "vocab_size": len(tokenizer), "eos_token_id": eos_id,
                "num_tokens": {s: p["tokens"] for s, p in packed.items()},
                "num_chars": {s: p["chars"] for s, p in packed.items()}}
        write_json(tmp / "tokens" / "meta.json", meta)
        stats = {
            "vocab_size": len(tokenizer),
            "chars_per_token": {s: round(p["chars"] / max(1, p["tokens"] - p["documents"]), 4)
                                for s, p in packed.items()},
            "character_coverage": {"validation": round(coverage(list(validation), tokenizer.get_vocab()), 6)},
            "byte_fallback_token_share": {s: round(p["byte_fallback_tokens"] / max(1, p["tokens"]), 6)
                                          for s, p in packed.items()},
            "packed": packed,
            "training_text": {"lines": len(lines), "chars": sum(char_counts.values()),
                              "distinct_chars": len(char_counts)},
        }
        write_json(tmp / "stats.json", stats)
        save_config(cfg, tmp / "config.json")
        write_json(tmp / DONE, done_payload(cfg, {k: stats[k] for k in ("vocab_size", "chars_per_token")}))
    log.info("wrote %s: %s", cfg.output_dir, json.dumps({k: stats[k] for k in
                                                         ("vocab_size", "chars_per_token", "character_coverage")}))


if __name__ == "__main__":
    main()
