"""The one renderer from conversations to training ids, used by every stage that trains on chats.

`render_chat` applies the tokenizer's own chat template (ChatML from step0) and marks as labels exactly
the tokens of assistant replies, including their closing <|im_end|>; the role headers, system and user
turns and the newline after <|im_end|> are -100. Token spans come from the fast tokenizer's character
offsets over the rendered text, so the ids are those of tokenizing the whole conversation at once.

Batch layouts (collators below):
  padded: input_ids (B, T) right-padded with pad_token_id, attention_mask (B, T), labels (B, T) -100 on pads
  packed: several conversations per row; input_ids (B, T), labels (B, T), position_ids (B, T) restarting
          at 0 for every conversation and no attention_mask: transformers then builds a block-diagonal
          causal mask, so no token attends across conversations.
Both add loss_weights (B, T) float, 0 on pads, when the rows carry per-token weights
(`with_conversation_weights`, `with_task_weights`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from utils.errors import UserError
from utils.losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate one conversation: a list of {"role", "content"} with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, "
                            f"'content': str}}, got {str(m)[:80]!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to learn from")
    return messages


def _template(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_chat(tokenizer, messages: list[dict[str, str]], max_len: int | None = None) -> dict[str, list[int]]:
    """ids and labels of one conversation (truncated to `max_len` tokens from the right)."""
    text = _template(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []  # character spans that carry loss
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True)
        through = _template(tokenizer, messages[:i + 1], False)
        if not text.startswith(before) or not text.startswith(through):
            raise UserError("the tokenizer's chat template is not prefix-stable; use step0's ChatML tokenizer")
        end = len(through.rstrip("\n"))  # the reply and its end marker, not the newline after it
        spans.append((len(before), end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[j] = ids[j]
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def _scored(row: dict[str, list]) -> list[int]:
    """Label positions scored by next-token loss (index >= 1, label not -100)."""
    return [j for j in range(1, len(row["labels"])) if row["labels"][j] != IGNORE_INDEX]


def _weighted(row: dict[str, list], scored: list[int], weight: float) -> dict[str, list]:
    weights = [0.0] * len(row["labels"])
    for j in scored:
        weights[j] = weight
    return {**row, "loss_weights": weights}


def with_conversation_weights(row: dict[str, list]) -> dict[str, list]:
    """`row` plus loss_weights: 1/n on each of its n label positions (those scored by next-token loss, index
    >= 1), so that every conversation weighs the same in the loss whatever the length of its replies."""
    scored = _scored(row)
    return _weighted(row, scored, 1.0 / len(scored))


def with_task_weights(rows: Sequence[dict[str, list]], tasks: Sequence[Any]) -> list[dict[str, list]]:
    """`rows` plus loss_weights that give each task (tasks[i] is row i's) the share of the loss its share of
    the conversations is, spread evenly over that task's label tokens: a task of 2-token answers weighs as
    many conversations as it has, and within a task every token weighs the same (as with token weighting).
    The weights of a task's rows sum to its number of conversations."""
    scored = [_scored(row) for row in rows]
    conversations, tokens = Counter(tasks), Counter()
    for positions, task in zip(scored, tasks, strict=True):
        tokens[task] += len(positions)
    return [_weighted(row, positions, conversations[task] / tokens[task])
            for row, positions, task in zip(rows, scored, tasks, strict=True)]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a conversation followed by the assistant header: what generation continues from."""
    return tokenizer(_template(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def render_response(tokenizer, prompt: str, response: str, max_len: int | None = None) -> list[int]:
    """Ids of the exchange (user: prompt, assistant: response) ending at the reply's <|im_end|>, the token a
    reward model scores. Too long: the start of the prompt is cut, so the reply and its end survive."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = _template(tokenizer, messages, False).rstrip("\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_len:] if max_len is not None else ids


def right_pad(rows: Sequence[dict[str, list]], key: str, fill: int | float,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """rows[i][key] as a (B, T) tensor, right-padded with `fill` to the longest row."""
    width = max(len(r[key]) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r[key])] = torch.tensor(r[key], dtype=dtype)
    return out


def _add_weights(batch: dict[str, torch.Tensor], rows: Sequence[dict[str, list]]) -> dict[str, torch.Tensor]:
    if "loss_weights" in rows[0]:
        batch["loss_weights"] = right_pad(rows, "loss_weights", 0.0, torch.float32)
    return batch


@dataclass
class PaddedCollator:
    """Right-pads rendered rows to the longest in the batch (layout in the module docstring)."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = right_pad(rows, "input_ids", self.pad_token_id)
        mask = right_pad([{"m": [1] * len(r["input_ids"])} for r in rows], "m", 0)
        return _add_weights({"input_ids": ids, "attention_mask": mask, "labels": right_pad(rows, "labels", IGNORE_INDEX)},
                            rows)

    @staticmethod
    def length(row: dict[str, list[int]]) -> int:
        """The padded width this row asks of its batch (Trainer's grouping by length)."""
        return len(row["input_ids"])


def pack_rows(rows: Sequence[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate rendered conversations (in the given order) into rows of <= max_len tokens,
    with position_ids restarting at 0 for each conversation (loss_weights, when present, travel along)."""
    keys = [k for k in ("input_ids", "labels", "loss_weights") if rows and k in rows[0]]
    packed: list[dict[str, list]] = []
    current: dict[str, list] = {k: [] for k in (*keys, "position_ids")}
    for r in rows:
        n = len(r["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_len:
            packed.append(current)
            current = {k: [] for k in (*keys, "position_ids")}
        for k in keys:
            current[k] += r[k]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed


@dataclass
class PackedCollator:
    """Pads packed rows to the longest; the padding continues the positions of a last pseudo-sequence
    (layout in the module docstring)."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = right_pad(rows, "input_ids", self.pad_token_id)
        positions = right_pad(rows, "position_ids", 0)
        width = ids.shape[1]
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            positions[i, n:] = torch.arange(width - n)
        return _add_weights({"input_ids": ids, "position_ids": positions,
                             "labels": right_pad(rows, "labels", IGNORE_INDEX)}, rows)
