"""SFT data for step 1: conversations from data_process's sft/ dir (or a JSONL file of {"messages"} rows),
rendered to ids and labels by utils.chat."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

from utils.chat import check_messages, render_chat
from utils.data import check_lengths
from utils.errors import UserError
from utils.tasks import read_jsonl

log = logging.getLogger(__name__)


def load_sft_split(path: str, split: str, required: bool = True) -> tuple[list[list[dict[str, str]]], list[Any]]:
    """The `messages` of every row of `split` ("train"/"validation"), and each row's `task` (None where the
    row names none).

    `path` is a dir written by datasets' save_to_disk (a DatasetDict with that split, or one Dataset used as
    train) or a .jsonl file (used as train). Other formats go through data_process first.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        rows: list[Any] = read_jsonl(p) if split == "train" else []
    elif p.is_dir():
        try:
            data = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"--data_path {path}: not a dataset dir written by data_process ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            rows = list(data[split]) if split in data else []
        else:
            rows = list(data) if split == "train" else []
    else:
        raise UserError(f"--data_path {path}: not found: give data_process's sft/ dir or a .jsonl of "
                        "{\"messages\": [...]} rows")
    if required and not rows:
        raise UserError(f"--data_path {path}: no '{split}' rows")
    conversations, tasks = [], []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise UserError(f"{path} ({split} row {i + 1}): no 'messages' field: convert prompt/response or "
                            "instruction/input/output data with data_process/main.py first")
        conversations.append(check_messages(row["messages"], f"{path} ({split} row {i + 1})"))
        tasks.append(row.get("task"))
    return conversations, tasks


def render_rows(conversations: list[list[dict[str, str]]], tokenizer, max_len: int, split: str,
                long_inputs: str = "truncate", where: str = "--data_path", tasks: list[Any] | None = None) -> list[dict]:
    """Rendered rows, cut to max_len (or a UserError when `long_inputs` is "reject"); rows whose replies fall
    entirely beyond max_len are dropped (and counted). With `tasks` (one per conversation) each row keeps its
    task under "task"."""
    full = [render_chat(tokenizer, messages) for messages in conversations]
    check_lengths([len(r["input_ids"]) for r in full], max_len, long_inputs, f"{where} ({split})")
    rendered, dropped = [], 0
    for i, whole in enumerate(full):
        row = {k: v[:max_len] for k, v in whole.items()}
        if all(t == -100 for t in row["labels"][1:]):
            dropped += 1
            continue
        if tasks is not None:
            row["task"] = tasks[i]
        rendered.append(row)
    if dropped:
        log.warning("%s: %d of %d conversations dropped: no reply token left within --max_seq_len=%d",
                    split, dropped, len(conversations), max_len)
    return rendered
