"""Scorers of the verifiable demo tasks (answers defined in shared DEMO_DATA.md) and the held-out task
evaluation by greedy generation.

- sentiment: exact match of the stripped answer with 正面 / 负面, the share of 正面 answers, and the ROC AUC of
  the model's margin log p(正) - log p(负) at the answer's first token (does the model separate the
  classes at all, whatever its bias?)
- segmentation: word-span F1 (spans over the characters, spaces removed), micro-averaged over sentences
- ner: micro F1 over distinct (type, text) pairs parsed from "人名：…；地名：…；机构名：…", also per type
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from utils.errors import UserError

NER_TYPES = {"人名": "PER", "地名": "LOC", "机构名": "ORG"}


def word_spans(segmented: str) -> set[tuple[int, int]]:
    """(start, end) character spans of the words of a space-separated sentence."""
    spans, pos = set(), 0
    for word in segmented.split():
        spans.add((pos, pos + len(word)))
        pos += len(word)
    return spans


def parse_entities(answer: str) -> set[tuple[str, str]]:
    """{(PER|LOC|ORG, text)} from an answer in the NER format; unknown fields and 无 are ignored."""
    found = set()
    for part in re.split(r"[；;]", answer):
        if "：" not in part and ":" not in part:
            continue
        label, _, values = re.split(r"([：:])", part.strip(), maxsplit=1)
        kind = NER_TYPES.get(label.strip())
        if kind is None:
            continue
        for value in re.split(r"[、,，]", values):
            value = value.strip()
            if value and value != "无":
                found.add((kind, value))
    return found


def _f1(tp: int, n_pred: int, n_gold: int) -> float:
    if n_pred == 0 and n_gold == 0:
        return 1.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


SENTIMENT_LABELS = ("正面", "负面")


def score_sentiment(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    correct = sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True))
    positive = sum(p.strip() == SENTIMENT_LABELS[0] for p in preds)
    return {"sentiment_acc": correct / max(len(refs), 1), "sentiment_pos_rate": positive / max(len(preds), 1)}


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count one half): the
    Mann-Whitney U statistic over the product of the class sizes. NaN when a class is empty."""
    pos = [s for s, y in zip(scores, positive, strict=True) if y]
    neg = [s for s, y in zip(scores, positive, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def score_segmentation(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    tp = n_pred = n_gold = 0
    for p, r in zip(preds, refs, strict=True):
        ps, gs = word_spans(p), word_spans(r)
        tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    return {"segmentation_f1": _f1(tp, n_pred, n_gold)}


def score_ner(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    counts = {k: [0, 0, 0] for k in ("ALL", *NER_TYPES.values())}
    for p, r in zip(preds, refs, strict=True):
        pe, ge = parse_entities(p), parse_entities(r)
        for kind in counts:
            pk = {e for e in pe if kind == "ALL" or e[0] == kind}
            gk = {e for e in ge if kind == "ALL" or e[0] == kind}
            counts[kind][0] += len(pk & gk)
            counts[kind][1] += len(pk)
            counts[kind][2] += len(gk)
    result = {"ner_f1": _f1(*counts["ALL"])}
    for kind in NER_TYPES.values():
        result[f"ner_f1_{kind}"] = _f1(*counts[kind])
    return result


# eval/<task>_typed.jsonl holds the items of eval/<task>.jsonl with their prompts typed as users type them
# (half-width or mixed punctuation); their scores carry the prefix "typed_"
TYPED_SUFFIX = "_typed"
TYPED_PREFIX = "typed_"

# eval file stem -> scorer
SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], dict[str, float]]] = {
    "t1_sentiment": score_sentiment,
    "t2_segmentation": score_segmentation,
    "t3_ner": score_ner,
}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a UserError naming file and line for a malformed line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: malformed JSON ({err.msg}): fix or remove the line") from None
    return rows


def load_task_evals(eval_dir: str | Path, limit: int, flag: str = "--eval_task_dir") -> dict[str, list[dict[str, Any]]]:
    """The first `limit` rows of each verifiable task's eval/<task>.jsonl (and of its typed twin
    <task>_typed.jsonl) found in `eval_dir`; a UserError (naming `flag`) when there is none."""
    sets = {}
    for task in (name for base in SCORERS for name in (base, base + TYPED_SUFFIX)):
        path = Path(eval_dir) / f"{task}.jsonl"
        if path.is_file():
            rows = read_jsonl(path)[:limit]
            for i, row in enumerate(rows):
                if not isinstance(row.get("prompt"), str) or not isinstance(row.get("reference"), str):
                    raise UserError(f"{path}:{i + 1}: needs string fields 'prompt' and 'reference'")
            sets[task] = rows
    if not sets:
        raise UserError(f"{flag} {eval_dir}: no {'/'.join(SCORERS)} .jsonl files there: point it at "
                        "data_process's eval/ dir")
    return sets


def evaluate_tasks(model, tokenizer, sets: dict[str, list[dict[str, Any]]], batch_size: int,
                   max_new_tokens: int, answers_out: dict[str, list] | None = None) -> dict[str, float]:
    """Greedy answers to every held-out task prompt, scored (for sentiment also the AUC of the first-token
    margin, utils.generation.first_token_margins). Ranks split the prompts (equal batch counts, so ZeRO-3's
    collective weight gathers stay in step) and share their answers. `answers_out`, when given, receives
    each task's answers in prompt order (for sentiment, (answer, margin) pairs)."""
    import torch  # torch only for scoring a model; data_process uses the task definitions without it

    from utils.chat import prompt_ids
    from utils.dist import get_rank, get_world_size
    from utils.generation import SamplingConfig, first_token_margins, generate_replies

    world, rank = get_world_size(), get_rank()
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    results: dict[str, float] = {}
    for task, rows in sets.items():
        base = task.removesuffix(TYPED_SUFFIX)
        prefix = TYPED_PREFIX if base != task else ""
        mine = rows[rank::world]
        per_rank = -(-len(rows) // world)
        padded = mine + rows[:1] * (per_rank - len(mine))  # stand-ins, dropped below
        convs = [[{"role": "user", "content": r["prompt"]}] for r in padded]
        answers: list[Any] = generate_replies(model, tokenizer, convs, sampling, batch_size,
                                              synced_gpus=world > 1)
        if base == "t1_sentiment":
            margins = first_token_margins(model, tokenizer, [prompt_ids(tokenizer, c) for c in convs],
                                          SENTIMENT_LABELS, batch_size)
            answers = list(zip(answers, margins, strict=True))
        answers = answers[:len(mine)]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, answers)
            ordered = [None] * len(rows)
            for r, part in enumerate(gathered):
                ordered[r::world] = part
            answers = ordered
        refs = [r["reference"] for r in rows]
        if answers_out is not None:
            answers_out[task] = list(answers)
        if base == "t1_sentiment":
            answers, margins = zip(*answers, strict=True)
            results[prefix + "sentiment_auc"] = roc_auc(margins, [ref.strip() == SENTIMENT_LABELS[0] for ref in refs])
        results.update({prefix + k: v for k, v in SCORERS[base](answers, refs).items()})
    return results
