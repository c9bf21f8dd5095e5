"""Score any exported chat model on the verifiable held-out tasks, the way SFT's evaluation does.

    python step1_pretrain_sft/score_tasks.py --model OUT/step1_sft/final --eval_task_dir OUT/data/eval \
        --samples 300 --out OUT/step1_sft/tasks.json

Greedy answers to the first --samples prompts of t1_sentiment, t2_segmentation and t3_ner (utils.tasks):
sentiment accuracy, the share of 正面 answers and the AUC of the first-token margin log p(正) - log p(负),
segmentation F1, NER F1 (also per type); --out also keeps every answer (and each sentiment margin) next to
its prompt and reference, to read the errors. Works on every model dir a step exports (SFT, PPO, DPO), so it
also shows what RLHF did to the task skills.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.config import option, parse_config, require
from utils.errors import main_guard
from utils.tasks import evaluate_tasks, load_task_evals


@dataclass
class ScoreConfig:
    """Held-out task scores of one exported model."""

    model: str = option("", "An exported model dir (with its tokenizer).")
    eval_task_dir: str = option("", "data_process's eval/ dir (t1_sentiment.jsonl, ...).")
    samples: int = option(300, "Prompts per task (the first N).")
    max_new_tokens: int = option(96, "Answer length limit in tokens.")
    batch_size: int = option(16, "Prompts generated together.")
    out: str = option("", "JSON file for the scores and every answer ('' = print only).")

    def validate(self) -> None:
        require(bool(self.model), "model", self.model, "give an exported model dir")
        require(bool(self.eval_task_dir), "eval_task_dir", self.eval_task_dir, "give data_process's eval/ dir")
        require(self.samples >= 1, "samples", self.samples, "must be >= 1")


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ScoreConfig, argv, prog="step1_pretrain_sft/score_tasks.py")
    from utils.model import load_causal_lm  # after the flags: a bad flag is answered before torch loads
    from utils.tokenizer import load_tokenizer_dir

    sets = load_task_evals(cfg.eval_task_dir, cfg.samples)
    model, tokenizer = load_causal_lm(cfg.model).eval(), load_tokenizer_dir(cfg.model, "--model")
    answers: dict[str, list] = {}
    scores = evaluate_tasks(model, tokenizer, sets, cfg.batch_size, cfg.max_new_tokens, answers)
    report = {"model": cfg.model, "samples": {task: len(rows) for task, rows in sets.items()}, **scores}
    for key, value in scores.items():
        print(f"{key:<22}{value:.4f}")
    if cfg.out:
        items = {task: [{"prompt": row["prompt"], "reference": row["reference"],
                         **({"answer": a[0], "margin": a[1]} if task == "t1_sentiment" else {"answer": a})}
                        for row, a in zip(sets[task], answers[task], strict=True)] for task in sets}
        Path(cfg.out).write_text(json.dumps({**report, "answers": items}, ensure_ascii=False, indent=1) + "\n",
                                 encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
