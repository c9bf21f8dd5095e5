"""An example of your own reward functions for step 3's GRPO path:

    python step3_rlhf_ppo/grpo.py ... --reward_funcs task python:docs/examples/rewards.py:polite_and_brief \
        --reward_weights 1.0 0.2

A reward function takes the batch's prompts, the model's replies (text, end marker removed) and the data
rows they answer (every field of your JSONL row, so a row can carry its own reference, keywords, tests ...)
and returns one float per reply. It runs on every rank for that rank's replies; keep it cheap and
deterministic. An exception, a wrong count or a NaN stops the run with one error line naming the function.
"""

from __future__ import annotations


def polite_and_brief(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """+0.5 for a reply that thanks or greets, minus 0.01 per character beyond the row's `max_chars`
    (default 60)."""
    rewards = []
    for reply, row in zip(completions, rows, strict=True):
        score = 0.5 if any(word in reply for word in ("谢谢", "您好", "你好")) else 0.0
        score -= 0.01 * max(0, len(reply) - int(row.get("max_chars", 60)))
        rewards.append(score)
    return rewards


def contains_keyword(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1 when the reply contains the row's `keyword` field, else 0 (rows: {"prompt": ..., "keyword": ...})."""
    return [float(row["keyword"] in reply) for reply, row in zip(completions, rows, strict=True)]
