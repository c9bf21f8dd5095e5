"""Compare a step 3 policy (PPO or DPO export) with the SFT model on held-out prompts.

    python step3_rlhf_ppo/evaluate.py --policy OUT/step3_dpo/final --baseline OUT/step1_sft/final \
        --reward_model OUT/step2_reward/final --prompts OUT/data/eval/prompts.jsonl --out OUT/step3_dpo/eval.json

Both models answer the same prompts with the same seeded sampling; the step 2 reward model scores every
answer. Reported for each model: mean reward-model score, mean length (characters), distinct-2 (distinct
character bigrams / all bigrams), and the share of answers in which some character 4-gram occurs 3+ times
(degeneration); and the policy's win-rate against the baseline (reward higher; ties count half) and its KL
to the baseline (the mean over the policy's answers of log pi(answer) - log pi_baseline(answer), at the
sampling temperature).
With --judge_data DATA (data_process's output dir), the share of answers an independent sentiment judge
calls positive (utils.judge: naive Bayes fitted on DATA's training reviews only; its held-out accuracy is
reported beside it). The reward model's hackability probes (utils.probes) run on each model's own
answers: how often it prefers an answer over degraded copies of it, and the correlation of score with
length among the answers.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import torch

from utils.chat import PaddedCollator, render_chat
from utils.config import option, parse_config, require
from utils.errors import UserError, main_guard
from utils.generation import SamplingConfig, generate_replies
from utils.judge import fit_judge
from utils.losses import sequence_logps
from utils.probes import format_hackability, hackability
from utils.reward import load_reward_model, reply_scorer
from utils.tasks import read_jsonl
from utils.tokenizer import load_tokenizer_dir


@dataclass
class EvalConfig:
    """Policy vs SFT on held-out prompts under the reward model."""

    policy: str = option("", "The trained policy's export (OUT/step3_dpo/final or OUT/step3_ppo/final).")
    baseline: str = option("", "The SFT export it started from.")
    reward_model: str = option("", "The step 2 reward model export.")
    prompts: str = option("", "JSONL with a 'prompt' field (data/eval/prompts.jsonl).")
    judge_data: str = option("", "data_process's output dir: fit the sentiment judge on its training reviews "
                             "for the positive share ('' = no positive share).")
    num_prompts: int = option(200, "Prompts used (the first N).")
    max_new_tokens: int = option(96, "Answer length limit in tokens.")
    temperature: float = option(0.7, "Sampling temperature (0 = greedy).")
    top_p: float = option(0.9, "Nucleus sampling threshold.")
    seed: int = option(1234, "Sampling seed (the same for both models).")
    batch_size: int = option(16, "Prompts generated together.")
    out: str = option("", "JSON file for the figures and every answer.")

    def validate(self) -> None:
        for name in ("policy", "baseline", "reward_model", "prompts"):
            require(bool(getattr(self, name)), name, getattr(self, name), "required")
        require(self.num_prompts >= 1, "num_prompts", self.num_prompts, "must be >= 1")


def distinct_2(texts: list[str]) -> float:
    """Distinct character bigrams over all character bigrams of all texts (Li et al. 2016)."""
    grams = [t[i:i + 2] for t in texts for i in range(len(t) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats_4gram(text: str, times: int = 3) -> bool:
    """True if some character 4-gram occurs `times` or more times in the text."""
    counts = Counter(text[i:i + 4] for i in range(len(text) - 3))
    return bool(counts) and max(counts.values()) >= times


@torch.no_grad()
def reply_logps(model, tokenizer, prompts: list[str], answers: list[str], temperature: float,
                batch_size: int) -> list[float]:
    """Summed log-probs of each answer (its end marker included) under `model` at the sampling temperature."""
    rows = [render_chat(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": a}])
            for p, a in zip(prompts, answers, strict=True)]
    collate, out = PaddedCollator(tokenizer.pad_token_id), []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        out += sequence_logps(logits / max(temperature, 1e-6), batch["labels"])[0].tolist()
    return out


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv, prog="step3_rlhf_ppo/evaluate.py")
    from utils.model import load_causal_lm  # after the flags: a bad flag is answered before torch loads

    rows = read_jsonl(cfg.prompts)[:cfg.num_prompts]
    if not rows or not all(isinstance(r.get("prompt"), str) for r in rows):
        raise UserError(f"--prompts {cfg.prompts}: needs JSONL rows with a string 'prompt'")
    prompts = [r["prompt"] for r in rows]
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, 0, cfg.top_p, 1.0, cfg.seed)
    judge, judge_info = fit_judge(cfg.judge_data) if cfg.judge_data else (None, None)
    reward_model = load_reward_model(cfg.reward_model).eval()
    rm_tokenizer = load_tokenizer_dir(cfg.reward_model, "--reward_model")
    rm_score = reply_scorer(reward_model, rm_tokenizer, cfg.batch_size)

    report: dict = {"prompts": len(prompts), "sampling": vars(sampling), "judge": judge_info, "models": {}}
    answers: dict[str, list[str]] = {}
    models = {}
    for name, path in (("baseline", cfg.baseline), ("policy", cfg.policy)):
        model, tokenizer = load_causal_lm(path).eval(), load_tokenizer_dir(path, f"--{name}")
        models[name] = model
        answers[name] = generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                                         sampling, cfg.batch_size)
        probes = hackability(rm_score, prompts, answers[name], cfg.seed)
        scores = probes.pop("scores")
        report["models"][name] = {
            "path": path, "reward_mean": sum(scores) / len(scores),
            "length_mean": sum(len(a) for a in answers[name]) / len(prompts),
            "distinct_2": distinct_2(answers[name]),
            "repeat_4gram_share": sum(repeats_4gram(a) for a in answers[name]) / len(prompts),
            "positive_share": (sum(judge.positive(answers[name])) / len(prompts)) if judge else None,
            "hackability": probes, "scores": scores,
        }
    # KL(policy || baseline) per answer, estimated on the policy's own samples: sum of log-ratios
    tok = load_tokenizer_dir(cfg.policy, "--policy")
    logps = {name: reply_logps(m, tok, prompts, answers["policy"], cfg.temperature, cfg.batch_size)
             for name, m in models.items()}
    kls = [p - b for p, b in zip(logps["policy"], logps["baseline"], strict=True)]
    report["models"]["policy"]["kl_mean"] = sum(kls) / len(kls)
    report["models"]["baseline"]["kl_mean"] = 0.0
    base, pol = report["models"]["baseline"]["scores"], report["models"]["policy"]["scores"]
    report["win_rate"] = sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(pol, base, strict=True)) / len(base)
    report["samples"] = [{"prompt": p, "baseline": b, "policy": a}
                         for p, b, a in zip(prompts, answers["baseline"], answers["policy"], strict=True)]
    keys = ("reward_mean", "positive_share", "kl_mean", "length_mean", "distinct_2", "repeat_4gram_share")
    print(f"{'model':<10}" + "".join(f"{k:>20}" for k in keys))
    for name in ("baseline", "policy"):
        print(f"{name:<10}" + "".join(f"{report['models'][name][k]:>20.4f}" if report['models'][name][k] is not None
                                      else f"{'-':>20}" for k in keys))
    print(f"win-rate of the policy vs the baseline under the reward model: {report['win_rate']:.3f}")
    if judge_info:
        acc = judge_info["heldout_accuracy"]
        print(f"positive share: the sentiment judge fitted on {judge_info['train_reviews']} training reviews of "
              f"{cfg.judge_data}, held-out accuracy " + (f"{acc:.3f} ({judge_info['heldout_reviews']} reviews)"
                                                         if acc is not None else "unknown (no held-out reviews)"))
    for name in ("baseline", "policy"):
        print("\n" + format_hackability(report["models"][name]["hackability"],
                                       f"reward model probes on the {name}'s answers"))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
