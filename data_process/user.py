"""Datasets from user files, DeepSpeed-Chat style: one dataset can feed steps 1-3 without overlap.

Each cleaned row goes, by a seeded hash of its text, first to the held-out eval set (--eval_ratio), then to
one phase by the --data_split weights (phase 1 SFT, phase 2 reward model, phase 3 PPO prompts), among the
phases the row can serve: a prompt/chosen/rejected row serves all three (phase 1 trains on prompt +
chosen), an SFT row phases 1 and 3 (its first user turn becomes a PPO prompt), a prompt-only row phase 3.
Text rows all go to pretraining. Train/validation is a further hash split. Rows stream: memory stays flat.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_process.clean import Cleaner, CleanOptions, Doc
from data_process.output import DatasetWriter, EvalWriter
from data_process.readers import Record, read_records
from data_process.text import normalize, unit_fraction

log = logging.getLogger(__name__)

PHASES = {"sft": (1, 3), "preference": (1, 2, 3), "prompts": (3,)}


def normalized(record: Record, simplified: bool) -> dict[str, Any]:
    """The record with every text field normalised."""
    if "messages" in record.data:
        return {"messages": [{"role": m["role"], "content": normalize(m["content"], simplified)}
                             for m in record.data["messages"]]}
    return {k: normalize(v, simplified) for k, v in record.data.items()}


def joined(data: dict[str, Any]) -> str:
    """All text of a row in one string: what its duplicates are judged by."""
    if "messages" in data:
        return "\n".join(m["content"] for m in data["messages"])
    return "\n".join(data.values())


def pick_phase(weights: list[float], allowed: tuple[int, ...], u: float) -> int:
    """The phase (1-3) a row with hash fraction `u` goes to, among `allowed`, by relative weight."""
    total = sum(weights[p - 1] for p in allowed)
    if total <= 0:
        return 0  # this row's kind gets no share of --data_split
    acc = 0.0
    for p in allowed:
        acc += weights[p - 1] / total
        if u < acc:
            return p
    return allowed[-1]


class UserBuilder:
    """Routes cleaned user rows to the datasets and eval files."""

    def __init__(self, root: Path, seed: int, data_split: list[float], eval_ratio: float,
                 validation_ratio: float, pretrain_validation_ratio: float):
        self.seed, self.weights = seed, data_split
        self.eval_ratio, self.validation_ratio = eval_ratio, validation_ratio
        self.pretrain_validation_ratio = pretrain_validation_ratio
        self.writers = {name: DatasetWriter(root, name) for name in ("pretrain", "sft", "preference", "prompts")}
        self.eval = EvalWriter(root)

    def split(self, text: str, ratio: float) -> str:
        return "validation" if unit_fraction(self.seed + 1, text) < ratio else "train"

    def route(self, kind: str, data: dict[str, Any], text: str) -> None:
        if kind == "pretrain":
            self.writers["pretrain"].add(self.split(text, self.pretrain_validation_ratio), {"text": data["text"]})
            return
        messages = data.get("messages") or [{"role": "user", "content": data["prompt"]}]
        user_turns = [m["content"] for m in messages if m["role"] == "user"] or [messages[0]["content"]]
        first_user, last_user = user_turns[0], user_turns[-1]  # PPO prompt; eval prompt of the final answer
        if unit_fraction(self.seed + 2, text) < self.eval_ratio:
            # every held-out row also gives a held-out prompt, so PPO and DPO can be compared with SFT on
            # any user data (eval/prompts.jsonl), not only on prompt-only rows
            if kind == "preference":
                self.eval.add("preference", {"task": "preference", "prompt": data["prompt"], "kind": "user",
                                             "reference": {"chosen": data["chosen"], "rejected": data["rejected"]}})
                self.eval.add("prompts", {"task": "user", "prompt": data["prompt"], "reference": data["chosen"]})
            elif kind == "sft":
                self.eval.add("user", {"task": "user", "prompt": last_user, "reference": messages[-1]["content"]})
                first_reply = next((m["content"] for m in messages if m["role"] == "assistant"), "")
                self.eval.add("prompts", {"task": "user", "prompt": first_user, "reference": first_reply})
            else:
                self.eval.add("prompts", {"task": "user", "prompt": data["prompt"], "reference": ""})
            return
        phase = pick_phase(self.weights, PHASES[kind], unit_fraction(self.seed + 3, text))
        if phase == 1:
            if kind == "preference":
                messages = [{"role": "user", "content": data["prompt"]},
                            {"role": "assistant", "content": data["chosen"]}]
            self.writers["sft"].add(self.split(text, self.validation_ratio), {"messages": messages, "task": "user"})
        elif phase == 2:
            self.writers["preference"].add(self.split(text, self.validation_ratio), {**data, "kind": "user"})
        elif phase == 3:
            self.writers["prompts"].add("train", {"prompt": first_user})

    def finish(self, cleaning: dict[str, dict[str, Any]]) -> dict[str, Any]:
        stats = {name: w.finish(cleaning.get(name, {})) for name, w in self.writers.items()}
        stats["eval"] = self.eval.finish({})
        return stats


def build_user(inputs: list[str], columns: list[str], txt_mode: str, opts: CleanOptions, workdir: Path, root: Path,
               seed: int, data_split: list[float], eval_ratio: float, validation_ratio: float,
               pretrain_validation_ratio: float) -> dict[str, Any]:
    """Read (through each input's --columns mapping or preset), clean and route every user row; return the
    stats. Structured rows skip the boilerplate filter (a shared instruction line is not boilerplate) and
    each kind dedups on its own."""
    record_opts = CleanOptions(**{**opts.__dict__, "boilerplate_max_repeats": 0})
    cleaners = {kind: Cleaner(opts if kind == "pretrain" else record_opts, workdir / kind)
                for kind in ("pretrain", "sft", "preference", "prompts")}

    def docs(kind_filter: str | None = None):
        for record in read_records(inputs, txt_mode, columns):
            if kind_filter and record.kind != kind_filter:
                continue
            if record.kind == "pretrain":
                yield record.kind, Doc(record.data["text"], record.where, 0)
            else:
                data = normalized(record, opts.simplified)
                yield record.kind, Doc(joined(data), record.where, 0, data)

    cleaners["pretrain"].count_lines(doc for _, doc in docs("pretrain"))
    builder = UserBuilder(root, seed, data_split, eval_ratio, validation_ratio, pretrain_validation_ratio)
    for kind, doc in tqdm(docs(), desc="clean", unit=" rows", mininterval=5):
        if cleaners[kind].keep(doc):
            builder.route(kind, doc.extra or {"text": doc.text}, doc.text)
    for kind, cleaner in cleaners.items():
        if cleaner.count_in:
            log.info("%s rows:", kind)
            cleaner.log_summary()
        cleaner.close()
    return builder.finish({kind: c.stats() for kind, c in cleaners.items()})
