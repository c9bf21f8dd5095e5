"""Reward functions for RL from verifiable rewards (step 3's group-relative path), chosen by name:

    task            the demo tasks by the row's `task` against its `reference` (utils.tasks' scorers):
                    sentiment = exact label, segmentation = F1 over correctly placed and copied words,
                    NER = F1 over entities; an answer in no task format scores 0
    rm:DIR          a step 2 reward model's score of prompt + reply
    length          0 up to the last quarter of --max_answer_seq_len, then falling linearly to -1 for a
                    reply cut at the limit (DAPO's soft overlong punishment)
    min_length:N    0 for a reply of N characters or more, falling linearly to -1 for an empty one (a floor
                    against a policy that learns to say less, e.g. PPO on a reward model that pays for brevity)
    repetition      minus the share of the reply's character 4-grams that repeat an earlier one
    python:FILE.py:FUNC   a function of yours: FUNC(prompts, completions, rows) -> list of floats, one per
                    completion (rows: the data rows, extra fields included); see docs/examples/rewards.py

Each is called on a whole batch of replies and returns one float per reply; the trainer weighs them with
--reward_weights and logs each on its own.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.preference import load_rows
from utils.tasks import SCORERS, parse_entities, score_ner, score_sentiment


@dataclass
class Replies:
    """What a reward function may look at: the batch's prompts, replies and data rows, the replies' token
    counts and whether each was cut at the length limit; `model_inputs` (ids, mask, positions) for
    model-based rewards."""

    prompts: list[str]
    completions: list[str]
    rows: list[dict[str, Any]]
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    model_inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardFunction:
    name: str
    weight: float
    fn: Callable[[Replies], Sequence[float]]
    needs: tuple[str, ...] = ()  # data fields every row must carry

    def __call__(self, replies: Replies) -> list[float]:
        try:
            values = self.fn(replies)
        except UserError:
            raise
        except Exception as err:  # a user function's bug: one line naming it, not a traceback
            raise UserError(f"reward function {self.name} raised {type(err).__name__}: {err}") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"reward function {self.name} must return a list of numbers, got "
                            f"{type(values).__name__}") from None
        if len(values) != len(replies.completions):
            raise UserError(f"reward function {self.name} returned {len(values)} values for "
                            f"{len(replies.completions)} completions: return one per completion")
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"reward function {self.name} returned NaN or inf: return finite numbers")
        return values


# ----------------------------------------------------------------------------------------------------
# Built-in rewards


def task_score(task: str, answer: str, reference: str) -> float:
    """One reply's score on a verifiable demo task, in [0, 1]:
    - sentiment: 1 for exactly the reference label;
    - segmentation: F1 over the answer's words, a word counting when both its position and its characters
      match the reference's (the held-out scorer compares positions only, so a reply that garbles the
      sentence's characters could score there without copying it; here a miscopied word earns nothing);
    - NER: F1 over (type, entity) pairs; an answer with none of the fields (人名, 地名, 机构名) scores 0."""
    base = task.removesuffix("_typed")
    if base == "t1_sentiment":
        return score_sentiment([answer], [reference])["sentiment_acc"]
    if base == "t2_segmentation":
        return _f1_of_sets(_words_at(answer), _words_at(reference))
    if base == "t3_ner":
        if not any(label in answer for label in ("人名", "地名", "机构名")):
            return 0.0
        if not parse_entities(reference) and not parse_entities(answer):
            return 1.0
        return score_ner([answer], [reference])["ner_f1"]
    raise UserError(f"task reward: unknown task {task!r}: rows need task one of {', '.join(SCORERS)}")


def _words_at(segmented: str) -> set[tuple[int, str]]:
    """(character offset, word) of each word of a space-separated sentence."""
    words, pos = set(), 0
    for word in segmented.split():
        words.add((pos, word))
        pos += len(word)
    return words


def _f1_of_sets(predicted: set, gold: set) -> float:
    if not predicted and not gold:
        return 1.0
    tp = len(predicted & gold)
    return 2 * tp / (len(predicted) + len(gold)) if tp else 0.0


def task_reward(replies: Replies) -> list[float]:
    return [task_score(r["task"], c, r["reference"]) for c, r in zip(replies.completions, replies.rows, strict=True)]


def length_penalty(max_len: int) -> Callable[[Replies], list[float]]:
    buffer = max(max_len // 4, 1)

    def penalty(replies: Replies) -> list[float]:
        return [-min(max(n - (max_len - buffer), 0) / buffer, 1.0) for n in replies.lengths]
    return penalty


def min_length_penalty(min_chars: int) -> Callable[[Replies], list[float]]:
    def penalty(replies: Replies) -> list[float]:
        return [-max(min_chars - len(c.strip()), 0) / min_chars for c in replies.completions]
    return penalty


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the text's character n-grams that repeat an earlier one (0 for a text without repeats)."""
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_penalty(replies: Replies) -> list[float]:
    return [-repeated_ngram_share(c) for c in replies.completions]


def reward_model_score(model_dir: str, tokenizer, micro_batch: int, zero_stage: int, precision) -> Callable:
    """The score a step 2 reward model gives prompt + reply (a frozen inference engine)."""
    # rm: needs torch and a model; the registry stays torch-free, and utils.rl_trainer imports it
    import torch

    from utils.engine import frozen_engine
    from utils.reward import load_reward_model, sequence_rewards
    from utils.rl_trainer import check_same_tokenizer

    check_same_tokenizer(tokenizer, model_dir, "reward model", "--reward_funcs rm:DIR")
    engine = frozen_engine(load_reward_model(model_dir), micro_batch, zero_stage, False, precision)

    def score(replies: Replies) -> list[float]:
        with torch.no_grad(), precision.autocast_context():
            return sequence_rewards(engine, **replies.model_inputs).float().tolist()
    return score


def user_function(spec: str) -> Callable[[Replies], list[float]]:
    """python:FILE.py:FUNC, loaded from the file (relative to the working directory)."""
    path, _, name = spec.removeprefix("python:").rpartition(":")
    if not path or not name:
        raise UserError(f"--reward_funcs {spec}: write python:FILE.py:FUNCTION")
    if not Path(path).is_file():
        raise UserError(f"--reward_funcs {spec}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"user_rewards_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise UserError(f"--reward_funcs {spec}: importing {path} raised {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward_funcs {spec}: {path} has no function {name}")
    return lambda replies: fn(replies.prompts, replies.completions, replies.rows)


def build_reward_functions(specs: Sequence[str], weights: Sequence[float], max_len: int,
                           model_reward: Callable[[str], Callable] | None = None) -> list[RewardFunction]:
    """The reward functions of --reward_funcs with their --reward_weights (all 1 when none are given).
    `model_reward(dir)` builds an rm:DIR scorer (it needs the run's tokenizer, batch and precision)."""
    if not specs:
        raise UserError("--reward_funcs is empty: name at least one of task, rm:DIR, length, min_length:N, "
                        "repetition, python:FILE.py:FUNC")
    if weights and len(weights) != len(specs):
        raise UserError(f"--reward_weights has {len(weights)} values for {len(specs)} --reward_funcs: give one "
                        "weight per function (or none for all 1)")
    if len(set(specs)) != len(specs):
        raise UserError(f"--reward_funcs {' '.join(specs)}: a function is named twice")
    funcs = []
    for spec, weight in zip(specs, weights or [1.0] * len(specs), strict=True):
        if spec == "task":
            funcs.append(RewardFunction(spec, weight, task_reward, needs=("task", "reference")))
        elif spec == "length":
            funcs.append(RewardFunction(spec, weight, length_penalty(max_len)))
        elif spec == "repetition":
            funcs.append(RewardFunction(spec, weight, repetition_penalty))
        elif spec.startswith("min_length:"):
            funcs.append(RewardFunction(spec, weight, min_length_penalty(_positive_int(spec))))
        elif spec.startswith("rm:") and model_reward is not None:
            if not Path(spec[3:]).is_dir():
                raise UserError(f"--reward_funcs {spec}: {spec[3:]} is not a directory: give a step 2 export")
            funcs.append(RewardFunction(spec, weight, model_reward(spec[3:])))
        elif spec.startswith("python:"):
            funcs.append(RewardFunction(spec, weight, user_function(spec)))
        else:
            raise UserError(f"--reward_funcs {spec}: unknown reward function: use task, rm:DIR, length, "
                            "min_length:N, repetition or python:FILE.py:FUNC")
    return funcs


def _positive_int(spec: str) -> int:
    name, _, value = spec.partition(":")
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--reward_funcs {spec}: write {name}:N with N a whole number of characters >= 1")
    return int(value)


def load_rl_rows(path: str | Path, split: str, funcs: Sequence[RewardFunction], flag: str) -> list[dict[str, Any]]:
    """Rows {"prompt", ...} of `split` (data_process's rl/ dir or a .jsonl); every row must carry what the
    reward functions need (the task reward: a known `task` and a string `reference`)."""
    rows = []
    for row, where in load_rows(path, split, "rl"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f"{where}: expected a JSON object with a non-empty string 'prompt'")
        for fn in funcs:
            for name in fn.needs:
                if not isinstance(row.get(name), str):
                    raise UserError(f"{where}: reward function {fn.name} needs a string field {name!r} in every "
                                    "row: add it or choose other --reward_funcs")
            if "task" in fn.needs and row["task"].removesuffix("_typed") not in SCORERS:
                raise UserError(f"{where}: task {row['task']!r} has no scorer: use one of {', '.join(SCORERS)} "
                                "(or a python: reward function)")
        rows.append(row)
    if not rows:
        raise UserError(f"{flag} {path}: no {split} rows")
    return rows
