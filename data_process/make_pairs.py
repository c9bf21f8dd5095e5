"""Preference pairs from the model's own answers (the Zero-Chatgpt recipe): for prompts whose human answer
the SFT model did not train on, the human answer is "chosen" and the model's own answer "rejected".

    python data_process/make_pairs.py --model OUT/step1_sft/final --data OUT/data/eval/t2_segmentation.jsonl \
        --out OUT/self_pairs [--temperature 0 --batch_size 16 --min_edit_distance 2 --max_length_ratio 3]

Input rows (any file data_process reads, one kind per file): {"prompt", "reference"} (the eval format),
{"prompt", "response"}, {"instruction", "input", "output"} or {"messages": [..., user, assistant]} (the
last user turn is the prompt, the last assistant turn the reference).
Generation is utils.generation's batched code, the same chat.py runs (same batches and seed -> the same
answers). Every batch of answers is appended to OUT/generations.jsonl and fsynced, so a rerun after a
crash continues after the last complete batch and ends with the same file as an uninterrupted run.
Pairs whose answer equals the reference or is empty are dropped and counted; optional filters drop pairs
whose two sides are nearly the same (--min_edit_distance, characters) or differ a lot in length
(--min/max_length_ratio, rejected/chosen): a reward model learns length easily, so pairs where "chosen" is
always the longer side teach it to reward length rather than quality.
Output: OUT/pairs/ (a save_to_disk DatasetDict, train + validation, in the preference format plus a
"generation" column with the settings) that step2 and the DPO path take as --data_path, and
OUT/pairs/stats.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from data_process.columns import detect
from data_process.readers import raw_rows
from utils.config import option, parse_config, require, require_non_negative, require_positive
from utils.errors import UserError, main_guard

log = logging.getLogger("make_pairs")

GENERATIONS = "generations.jsonl"
SETTINGS = "settings.json"


@dataclass
class PairsConfig:
    """Preference pairs: the reference answer is chosen, the model's own answer rejected."""

    model: str = option("", "The SFT export whose answers become the rejected side.")
    data: list[str] = option([], "Input files or dirs: rows with a prompt and a reference answer.")
    out: str = option("", "Output dir (generations.jsonl, pairs/).")
    task: list[str] = option([], "Keep only rows whose 'task' field is one of these (eval-format rows).")
    max_rows: int = option(0, "Use the first N rows (0 = all).")
    temperature: float = option(0.0, "Sampling temperature (0 = greedy).")
    top_k: int = option(0, "Sample from the k most likely tokens (0 = no limit).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    repetition_penalty: float = option(1.0, "Penalty > 1 discourages repeating tokens.")
    max_new_tokens: int = option(128, "Longest answer in tokens.")
    seed: int = option(0, "Sampling seed (each batch reuses it, as chat.py does).")
    batch_size: int = option(16, "Prompts generated together.")
    min_edit_distance: int = option(1, "Drop pairs whose sides are fewer than N character edits apart.")
    min_length_ratio: float = option(0.0, "Drop pairs with len(rejected)/len(chosen) below this (0 = off).")
    max_length_ratio: float = option(0.0, "Drop pairs with len(rejected)/len(chosen) above this (0 = off).")
    validation_share: float = option(0.05, "Share of pairs held out as the validation split.")
    force: bool = option(False, "Start over: discard generations.jsonl from an earlier run with other settings.")

    def validate(self) -> None:
        require(bool(self.model), "model", self.model, "give the SFT export (OUT/step1_sft/final)")
        require(bool(self.data), "data", self.data, "give at least one input file")
        require(bool(self.out), "out", self.out, "give an output dir")
        require_non_negative(self, "max_rows", "top_k", "seed")
        require_positive(self, "max_new_tokens", "batch_size", "min_edit_distance")
        require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0")
        require(self.min_length_ratio >= 0, "min_length_ratio", self.min_length_ratio, "must be >= 0")
        require(self.max_length_ratio == 0 or self.max_length_ratio >= self.min_length_ratio, "max_length_ratio",
                self.max_length_ratio, "must be 0 (off) or >= --min_length_ratio")
        require(0 <= self.validation_share < 1, "validation_share", self.validation_share, "must be in [0, 1)")

    def generation(self) -> dict[str, Any]:
        """What decides the answers (recorded with every pair, and compared on resume)."""
        return {"model": str(Path(self.model).resolve()), "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "batch_size": self.batch_size}


# ----------------------------------------------------------------------------------------------------
# Input rows


def _prompt_and_reference(row: Any, where: str) -> tuple[str, str]:
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("reference"), str):
        return row["prompt"], row["reference"]
    spec = detect(row, where)
    if spec.kind != "sft":
        raise UserError(f"{where}: needs a prompt and a reference answer ({{\"prompt\", \"reference\"}}, "
                        "{\"prompt\", \"response\"}, {\"instruction\", \"output\"} or \"messages\"), got a "
                        f"{spec.kind} row")
    messages = spec.apply(row, where)["messages"]
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise UserError(f"{where}: the answer must follow a user turn")
    return messages[-2]["content"], messages[-1]["content"]


def read_rows(cfg: PairsConfig) -> list[dict[str, str]]:
    """{"prompt", "reference", "task"} of every kept input row, in input order."""
    rows: list[dict[str, str]] = []
    for where, row in raw_rows(cfg.data):
        task = str(row.get("task", "")) if isinstance(row, dict) else ""
        if cfg.task and task not in cfg.task:
            continue
        prompt, reference = _prompt_and_reference(row, where)
        rows.append({"prompt": prompt, "reference": reference, "task": task or "self_generated"})
    if cfg.max_rows:
        rows = rows[:cfg.max_rows]
    if not rows:
        raise UserError(f"--data {' '.join(cfg.data)}: no rows" + (f" with task in {cfg.task}" if cfg.task else ""))
    return rows


# ----------------------------------------------------------------------------------------------------
# Resumable generation


def _load_done(path: Path, batch_size: int, n_rows: int) -> dict[int, str]:
    """Answers of the complete batches already in generations.jsonl (a batch cut off mid-write is dropped)."""
    if not path.is_file():
        return {}
    answers: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            answers[int(rec["index"])] = rec["answer"]
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            break  # a partial last line
    complete = {}
    for first in range(0, n_rows, batch_size):
        batch = range(first, min(first + batch_size, n_rows))
        if all(i in answers for i in batch):
            complete.update({i: answers[i] for i in batch})
    return complete


def generate_answers(cfg: PairsConfig, rows: list[dict[str, str]], out: Path) -> list[str]:
    """The model's answer to every row, generating only the batches not yet on disk. The model is loaded
    before anything is written, so a bad model dir leaves --out as it was."""
    settings = {"generation": cfg.generation(), "rows": len(rows)}
    settings_path, gen_path = out / SETTINGS, out / GENERATIONS
    stale = settings_path.is_file() and json.loads(settings_path.read_text(encoding="utf-8")) != settings
    if stale and not cfg.force:
        raise UserError(f"--out {out}: holds generations made with other settings or data ({settings_path}): "
                        "use a new --out, or --force to start over")
    done = {} if stale else _load_done(gen_path, cfg.batch_size, len(rows))
    todo = [first for first in range(0, len(rows), cfg.batch_size) if first not in done]
    if todo:
        # torch and the model only when there is something left to generate
        from utils.generation import SamplingConfig, generate_replies
        from utils.log import progress
        from utils.model import load_for_inference

        model, tokenizer = load_for_inference(cfg.model)
    settings_path.write_text(json.dumps(settings, indent=1, ensure_ascii=False), encoding="utf-8")
    # rewrite the kept part, so a cut-off tail (or, with --force, generations of other settings) is gone
    # before new lines are appended
    with open(gen_path, "w", encoding="utf-8") as f:
        for i in sorted(done):
            f.write(json.dumps({"index": i, "answer": done[i]}, ensure_ascii=False) + "\n")
    if done:
        log.info("resuming: %d of %d answers already generated", len(done), len(rows))
    if todo:
        sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                  cfg.repetition_penalty, cfg.seed)
        bar = progress(len(todo), desc="generate")
        with open(gen_path, "a", encoding="utf-8") as f:
            for first in todo:
                batch = rows[first:first + cfg.batch_size]
                replies = generate_replies(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in batch],
                                           sampling, cfg.batch_size)
                f.write("".join(json.dumps({"index": first + k, "answer": a}, ensure_ascii=False) + "\n"
                                for k, a in enumerate(replies)))
                f.flush()
                os.fsync(f.fileno())
                done.update({first + k: a for k, a in enumerate(replies)})
                bar.update(1)
        bar.close()
    return [done[i] for i in range(len(rows))]


# ----------------------------------------------------------------------------------------------------
# Pairs


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def drop_reason(cfg: PairsConfig, chosen: str, rejected: str) -> str | None:
    """Why a pair is dropped (None: kept)."""
    if not rejected.strip():
        return "empty_answer"
    if rejected.strip() == chosen.strip():
        return "answer_equals_reference"
    if edit_distance(chosen, rejected) < cfg.min_edit_distance:
        return "edit_distance"
    ratio = len(rejected) / max(len(chosen), 1)
    if (cfg.min_length_ratio and ratio < cfg.min_length_ratio) or (cfg.max_length_ratio and ratio > cfg.max_length_ratio):
        return "length_ratio"
    return None


def build_pairs(cfg: PairsConfig, rows: list[dict[str, str]], answers: list[str]) -> tuple[list[dict], dict[str, int]]:
    generation = json.dumps(cfg.generation(), ensure_ascii=False, sort_keys=True)
    pairs, dropped = [], {}
    for row, answer in zip(rows, answers, strict=True):
        reason = drop_reason(cfg, row["reference"], answer)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        pairs.append({"prompt": row["prompt"], "chosen": row["reference"], "rejected": answer, "kind": row["task"],
                      "generation": generation})
    return pairs, dropped


def write_pairs(cfg: PairsConfig, out: Path, pairs: list[dict], stats: dict[str, Any]) -> Path:
    """OUT/pairs as a save_to_disk DatasetDict (written beside, then renamed into place)."""
    import datasets  # datasets (~1.5 s to import) only when writing the pairs

    order = np.random.default_rng(cfg.seed).permutation(len(pairs)).tolist()
    n_val = int(round(len(pairs) * cfg.validation_share))
    splits = {"train": [pairs[i] for i in sorted(order[n_val:])], "validation": [pairs[i] for i in sorted(order[:n_val])]}
    features = datasets.Features({k: datasets.Value("string") for k in ("prompt", "chosen", "rejected", "kind",
                                                                          "generation")})
    final, tmp = out / "pairs", out / "pairs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # an empty split is left out (datasets cannot read back a split saved with no shards)
    columns = {k: {name: [row[name] for row in v] for name in features} for k, v in splits.items() if v}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(c, features=features)
                          for k, c in columns.items()}).save_to_disk(str(tmp))
    stats["splits"] = {k: len(v) for k, v in splits.items()}
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


@main_guard
def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(PairsConfig, argv, prog="data_process/make_pairs.py")
    from utils.log import setup_logging  # after the flags: a bad flag is answered before torch loads (~2 s)

    setup_logging()
    rows = read_rows(cfg)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {cfg.out}: cannot create it ({err.strerror})") from None
    answers = generate_answers(cfg, rows, out)
    pairs, dropped = build_pairs(cfg, rows, answers)
    if not pairs:
        raise UserError(f"--data {' '.join(cfg.data)}: every pair was dropped ({dropped}): loosen the filters")
    stats = {"rows": len(rows), "pairs": len(pairs), "dropped": dropped, "generation": cfg.generation(),
             "config": asdict(cfg)}
    path = write_pairs(cfg, out, pairs, stats)
    log.info("%d pairs from %d rows (dropped: %s) -> %s", len(pairs), len(rows), dropped or "none", path)
    return stats


if __name__ == "__main__":
    main()
