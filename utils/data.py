"""Data order and loading shared by every step.

`MicroBatchPlan` decides which rows each rank sees, so that runs with the same global batch see the same
rows whatever the split across processes and accumulation steps: the k-th global micro-batch of epoch e
is rows perm_e[k * world * micro : (k + 1) * world * micro] (perm_e a seeded permutation), dealt to the
ranks in turn, so rank r gets every world-th of them starting at r. One process with micro batch 8 and two
processes with micro batch 4 therefore cover the same 8 rows per step, and so does one process with micro
batch 1 and 8 accumulation steps. Dealing in turn also keeps any leading slice of the ranks' rows global:
rows [0, m) of every rank together are rows [0, m * world) of the single-process batch, which is what lets
PPO cut its experience into mini-batches the same way at any world size. The position in the data is one
integer (micro-batches consumed this epoch), which makes resume exact.

With `lengths` (one per row) the permutation is grouped by length, the way transformers' group_by_length
does it: perm_e is cut into chunks of `group_rows` rows, each chunk is sorted longest first and cut into
blocks of `block_rows` rows (one optimizer step's global batch), and the blocks are shuffled within the
chunk. Rows of similar length then share a batch (padded batches carry little padding) while the order of
batches stays random; as block_rows and group_rows count global rows, every split across processes and
accumulation steps still sees the same rows per step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.dist import get_rank, get_world_size
from utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicroBatchPlan:
    """Seeded, rank-aware order of micro-batches over a dataset of `num_rows` rows."""

    num_rows: int
    micro_batch: int
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True
    lengths: np.ndarray | None = None  # per row: group rows of similar length into the same batches
    group_rows: int = 0  # rows per length-sorted chunk (a multiple of block_rows)
    block_rows: int = 0  # rows per optimizer step, all ranks and accumulation steps together

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each rank gets per epoch (the last partial global micro-batch is dropped)."""
        return self.num_rows // (self.micro_batch * self.world_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_rows)
        if self.lengths is None:
            return perm
        for start in range(0, self.num_rows, self.group_rows):
            chunk = perm[start:start + self.group_rows]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            full = len(chunk) // self.block_rows * self.block_rows  # a partial last block stays last
            blocks = chunk[:full].reshape(-1, self.block_rows)[rng.permutation(full // self.block_rows)]
            perm[start:start + full] = blocks.reshape(-1)
            perm[start + full:start + len(chunk)] = chunk[full:]
        return perm

    def rows(self, epoch: int, k: int, perm: np.ndarray | None = None) -> list[int]:
        """Row indices of this rank's micro-batch `k` in `epoch`."""
        perm = self.permutation(epoch) if perm is None else perm
        start = k * self.world_size * self.micro_batch
        return perm[start + self.rank:start + self.world_size * self.micro_batch:self.world_size].tolist()

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        """(k, rows) for micro-batches k = start, start+1, ... of `epoch`."""
        perm = self.permutation(epoch)
        for k in range(start, self.micro_batches_per_epoch):
            yield k, self.rows(epoch, k, perm)


def shard_rows(num_rows: int, world_size: int, rank: int) -> list[int]:
    """Evaluation rows of this rank: every world_size-th row, so all ranks together cover each row once."""
    return list(range(rank, num_rows, world_size))


class PackedTokens(torch.utils.data.Dataset):
    """Fixed-length windows over a flat token file written by step0 (memory-mapped, nanoGPT style).

    Row i is tokens[i*T : (i+1)*T] with T = seq_len; documents are separated by <|endoftext|> inside it.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, dtype: str):
        path = Path(bin_path)
        if not path.is_file():
            raise UserError(f"{path}: token file not found: run step0 (bash training_scripts/step0.sh) first")
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len = seq_len
        if len(self.tokens) < seq_len:
            raise UserError(f"{path}: holds {len(self.tokens)} tokens, fewer than --max_seq_len={seq_len}")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = np.asarray(self.tokens[i * self.seq_len:(i + 1) * self.seq_len], dtype=np.int64)
        ids = torch.from_numpy(window)
        return {"input_ids": ids, "labels": ids.clone()}


def read_token_meta(tokens_dir: str | Path) -> dict[str, Any]:
    """The meta.json beside step0's packed token files."""
    meta_path = Path(tokens_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{tokens_dir}: no meta.json: point --data_path at step0's tokens/ dir")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def stack_collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length rows into (B, T) tensors."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def sharded_eval_batches(dataset: Any, collate: Callable, batch_size: int, max_batches: int, device,
                         ) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """(batch, real) over this rank's share of `dataset` (every world-th row).

    Every rank yields the same number of batches, since ZeRO-3 gathers weights collectively in each
    forward: a rank that has run out of rows gets a stand-in batch with real=False, to be ignored.
    """
    world = get_world_size()
    rows = shard_rows(len(dataset), world, get_rank())
    per_rank = -(-len(dataset) // world)
    n_batches = -(-per_rank // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        chunk = rows[b * batch_size:(b + 1) * batch_size]
        batch = collate([dataset[i] for i in (chunk or [0])])
        yield {k: v.to(device) for k, v in batch.items()}, bool(chunk)


def check_lengths(lengths: Sequence[int], max_len: int, policy: str, where: str, flag: str = "--max_seq_len",
                  action: str = "truncated") -> int:
    """How many rows are longer than `max_len` tokens. With --long_inputs reject, a UserError names the
    first of them; with truncate, a warning counts them (`action` says what happens to them)."""
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if over and policy == "reject":
        first = over[0]
        raise UserError(f"{where} row {first + 1}: {lengths[first]} tokens, longer than {flag}={max_len} "
                        f"({len(over)} of {len(lengths)} rows are): raise {flag}, shorten those rows, or pass "
                        "--long_inputs truncate")
    if over:
        log.warning("%s: %d of %d rows are longer than %s=%d tokens and were %s", where, len(over), len(lengths),
                    flag, max_len, action)
    return len(over)
