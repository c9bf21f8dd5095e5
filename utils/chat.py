"""The one renderer from conversations to training ids, used by every stage that trains on chats.

`render_chat` applies the tokenizer's own chat template (step0's ChatML, or that of an existing Hugging Face
model) and marks as labels exactly the tokens of assistant replies, including the end-of-turn token the
template writes after them (<|im_end|> in ChatML); the role headers, system and user turns and the newline
after the end of a turn are -100. Token spans come from the fast tokenizer's character offsets over the
rendered text, so the ids are those of tokenizing the whole conversation at once. This needs a
prefix-stable template: rendering the first turns alone (with the generation prompt before a reply) gives
the start of the whole conversation's text. Templates that rewrite earlier turns (drop their reasoning,
say) are refused with a UserError that says so.

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
from jinja2 import TemplateError

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
    if not tokenizer.chat_template:
        raise UserError("the tokenizer has no chat_template: give a tokenizer dir whose tokenizer_config.json (or "
                        "chat_template.jinja) defines one, such as step0's or an instruct model's")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"the tokenizer's chat template refused a conversation ({roles}): {err}") from None


def _unstable(turn: int, problem: str) -> UserError:
    return UserError(f"the tokenizer's chat template is not prefix-stable: {problem} (assistant message {turn}), "
                     "so the reply tokens to learn cannot be located: use a tokenizer whose chat_template renders "
                     "earlier turns unchanged and starts each reply with its generation prompt (edit chat_template "
                     "in a copy of the tokenizer dir and pass that dir as --tokenizer_path)")


def render_chat(tokenizer, messages: list[dict[str, str]], max_len: int | None = None) -> dict[str, list[int]]:
    """ids and labels of one conversation (truncated to `max_len` tokens from the right)."""
    text = _template(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []  # character spans that carry loss
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], True)
        through = _template(tokenizer, messages[:i + 1], False)
        if not text.startswith(through):
            raise _unstable(i, "it renders this reply differently once later turns follow (it rewrites "
                               "earlier turns, e.g. drops their reasoning)")
        if not through.startswith(before):
            raise _unstable(i, "the reply does not start with the text add_generation_prompt renders")
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


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template writes right after an assistant reply's content: what a model
    trained on its renderings emits to end its turn (<|im_end|> in ChatML, <|eot_id|> in Llama-3, the eos
    token in templates that close replies with it). Found by rendering a probe exchange and tokenizing the
    text that follows the reply, up to its first token that is not special; [] without a chat template."""
    if not tokenizer.chat_template:
        return []
    reply = "PROBE_REPLY_7"
    text = _template(tokenizer, [{"role": "user", "content": "PROBE_USER_3"},
                                 {"role": "assistant", "content": reply}], False)
    at = text.rfind(reply)
    if at < 0:
        raise UserError("the tokenizer's chat template does not render an assistant message's content")
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids: list[int] = []
    for token in tokenizer(text[at + len(reply):], add_special_tokens=False)["input_ids"]:
        if token not in special:
            break
        ids.append(token)
    return ids


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
    """Ids of the exchange (user: prompt, assistant: response) ending at the reply's end-of-turn token
    (<|im_end|> in ChatML), the token a reward model scores. Too long: the start of the prompt is cut, so the
    reply and its end survive."""
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
