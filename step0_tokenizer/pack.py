"""Packing for pretraining, nanoGPT style: every document of a split tokenized in parallel
(datasets.map with num_proc) and written into one flat token file, each document followed by the
<|endoftext|> id, so step 1 can np.memmap the file and cut fixed-length windows anywhere.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@functools.cache
def _load(tokenizer_file: str) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_file)  # once per worker process


def _encode(batch: dict, tokenizer_file: str, eos_id: int) -> dict:
    encodings = _load(tokenizer_file).encode_batch(batch["text"], add_special_tokens=False)
    return {"ids": [e.ids + [eos_id] for e in encodings], "num_chars": [len(t) for t in batch["text"]]}


def pack_split(dataset: datasets.Dataset, tokenizer_file: Path, eos_id: int, out_file: Path, dtype: np.dtype,
               num_proc: int, cache_dir: Path, byte_ids: range) -> dict[str, int]:
    """Tokenize `dataset` (column "text") into `out_file`; return its counts of documents, tokens,
    characters and byte-fallback tokens (ids in `byte_ids`)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    mapped = dataset.map(
        _encode, batched=True, batch_size=256, remove_columns=dataset.column_names,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 2 * num_proc else None,
        fn_kwargs={"tokenizer_file": str(tokenizer_file), "eos_id": eos_id},
        cache_file_name=str(cache_dir / f"{out_file.stem}.arrow"), desc=f"tokenize {out_file.stem}",
    )
    num_tokens = byte_tokens = 0
    with open(out_file, "wb") as f:
        for chunk in mapped.data.column("ids").chunks:
            ids = chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype)
            f.write(ids.tobytes())
            num_tokens += len(ids)
            byte_tokens += int(((ids >= byte_ids.start) & (ids < byte_ids.stop)).sum())
    stats = {"documents": len(mapped), "tokens": num_tokens, "byte_fallback_tokens": byte_tokens,
             "chars": int(mapped.data.column("num_chars").to_numpy().sum())}
    log.info("%s: %s", out_file.name, stats)
    return stats
