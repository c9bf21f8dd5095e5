"""Prompts (step3 PPO) and preference pairs (step2 reward model, step3 DPO): data_process's preference/ dir, or JSONL rows {"prompt", "chosen",
"rejected"} (also the eval format {"prompt", "reference": {"chosen", "rejected"}}), with optional "kind"
(reported separately) and "margin" (a per-pair margin for the loss)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.chat import render_response
from utils.data import check_lengths
from utils.errors import UserError
from utils.tasks import read_jsonl


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    kind: str = "all"
    margin: float = 0.0


def _to_pair(row: Any, where: str) -> Pair:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with prompt, chosen and rejected")
    if isinstance(row.get("reference"), dict) and "chosen" not in row:
        row = {**row, **row["reference"]}
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise UserError(f"{where}: missing string field {key!r} (needs prompt, chosen, rejected)")
    margin = row.get("margin", 0.0)
    if not isinstance(margin, int | float):
        raise UserError(f"{where}: 'margin' must be a number, got {margin!r}")
    return Pair(row["prompt"], row["chosen"], row["rejected"], str(row.get("kind") or "all"), float(margin))


def load_rows(path: str | Path, split: str, what: str) -> list[tuple[Any, str]]:
    """(row, where) of `split` from a save_to_disk dir, or of every row of a .jsonl file (any split);
    `where` names the file and line (or split and row) for error messages."""
    p = Path(path)
    if p.is_file():
        return [(r, f"{p}:{i + 1}") for i, r in enumerate(read_jsonl(p))]
    if not p.is_dir():
        raise UserError(f"{path}: not found: give data_process's {what}/ dir or a .jsonl of {what}")
    import datasets  # datasets (~1.5 s to import) only for save_to_disk dirs

    try:
        data = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path}: not a dataset dir written by data_process ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        data = data.get(split, [])
    elif split != "train":
        data = []
    return [(r, f"{p} ({split} row {i + 1})") for i, r in enumerate(data)]


def load_pairs(path: str | Path, split: str = "train", required: bool = True) -> list[Pair]:
    """Pairs of `split` from a save_to_disk dir, or all rows of a .jsonl file (used for any split)."""
    pairs = [_to_pair(row, where) for row, where in load_rows(path, split, "preference")]
    if required and not pairs:
        raise UserError(f"{path}: no {split} pairs")
    return pairs


def load_prompts(path: str | Path, split: str = "train", required: bool = True) -> list[str]:
    """Prompts ({"prompt": str} rows) of `split`: data_process's prompts/ dir, or a .jsonl file."""
    prompts = []
    for row, where in load_rows(path, split, "prompts"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{where}: expected a JSON object with a non-empty string 'prompt'")
        prompts.append(row["prompt"])
    if required and not prompts:
        raise UserError(f"{path}: no {split} prompts")
    return prompts


def encode_pairs(pairs: list[Pair], tokenizer, max_len: int, kinds: list[str], long_inputs: str = "truncate",
                 where: str = "pairs") -> list[dict[str, Any]]:
    """Token ids of both sides of every pair, with the index of its kind in `kinds`; a side longer than
    max_len loses the start of its prompt, or is a UserError with `long_inputs` "reject"."""
    rows = [{"chosen": render_response(tokenizer, p.prompt, p.chosen),
             "rejected": render_response(tokenizer, p.prompt, p.rejected),
             "margin": p.margin, "kind": kinds.index(p.kind)} for p in pairs]
    check_lengths([max(len(r["chosen"]), len(r["rejected"])) for r in rows], max_len, long_inputs, where,
                  action="cut at the start of the prompt")
    for r in rows:
        r["chosen"], r["rejected"] = r["chosen"][-max_len:], r["rejected"][-max_len:]
    return rows


@dataclass
class PairCollator:
    """Batch layout: input_ids / attention_mask (2P, T), the P chosen rows first, then the P rejected rows
    in the same order, right-padded with pad_token_id; margin (P,) float; kind (P,) long."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "margin": torch.tensor([float(r["margin"]) for r in rows]),
                "kind": torch.tensor([r["kind"] for r in rows], dtype=torch.long)}

    @staticmethod
    def length(row: dict[str, Any]) -> int:
        """The padded width this row asks of its batch (Trainer's grouping by length)."""
        return max(len(row["chosen"]), len(row["rejected"]))
