"""Evaluate a reward model export.

    python step2_reward_model/rw_eval.py --model OUT/step2_reward/final --pairs OUT/data/eval/preference.jsonl
        accuracy (r_chosen > r_rejected), mean scores, mean margin and loss, per kind, the hardest pairs,
        and the hackability table: how often the model prefers each chosen reply over degraded copies of it
        (repeated, shuffled, a keyword list, its first half, generic praise appended, a loop of its first
        clause; utils.probes), with a verdict per probe, and the correlation of score with length; and the
        accuracy over pairs whose chosen reply is the longer / of similar length / the shorter, with a verdict
        on whether the model pays for length (meaningful on pairs not matched by length, such as
        OUT/data/eval/preference_unmatched.jsonl)
    python step2_reward_model/rw_eval.py --model OUT/step2_reward/final --prompts rows.jsonl
        scores rows {"prompt", "response"} and prints them from best to worst
Add --out FILE.json to also write the figures (and per-row scores) as JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.config import option, parse_config, require
from utils.errors import UserError, main_guard
from utils.losses import pairwise_reward_loss
from utils.preference import load_pairs
from utils.probes import format_hackability, hackability
from utils.reward import load_reward_model, reply_scorer
from utils.tasks import read_jsonl
from utils.tokenizer import load_tokenizer_dir


@dataclass
class EvalConfig:
    """Score preference pairs or prompt/response rows with a reward model."""

    model: str = option("", "Reward model dir exported by step2 (its final/ dir).")
    pairs: str = option("", "JSONL of pairs {prompt, chosen, rejected} (or a preference dataset dir).")
    prompts: str = option("", "JSONL of rows {prompt, response} to score.")
    max_seq_len: int = option(512, "Tokens kept per scored sequence (the start of the prompt is cut).")
    batch_size: int = option(16, "Sequences per forward pass.")
    show: int = option(5, "How many hardest pairs / best and worst rows to print.")
    probes: bool = option(True, "With --pairs: the hackability table on the chosen replies (pairs of kinds other "
                          "than corrupted_answer and degraded_copy, replies of 8+ characters).")
    out: str = option("", "Optional JSON file for the figures and per-row scores.")

    def validate(self) -> None:
        require(bool(self.model), "model", self.model, "give a reward model dir (OUT/step2_reward/final)")
        require(bool(self.pairs) != bool(self.prompts), "pairs", self.pairs, "give exactly one of --pairs or --prompts")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.max_seq_len >= 8, "max_seq_len", self.max_seq_len, "must be >= 8")


NOT_PROBED = ("corrupted_answer", "degraded_copy")  # answers to checkable tasks, and the copies themselves
LENGTH_RATIO = 1.25  # a pair's chosen reply counts as the longer (shorter) one beyond this length ratio
LENGTH_MIN_PAIRS = 20  # pairs needed on each side before the length split gives a verdict
LENGTH_GAP = 0.10  # accuracy gap between the two sides above which the verdict says the model pays for length


def length_split(pairs: list, chosen: list[float], rejected: list[float]) -> dict:
    """Accuracy over the pairs (other than degraded copies, whose lengths are set by construction) whose
    chosen reply is the longer by LENGTH_RATIO or more, of similar length, or the shorter: a reward model
    that pays for length, or for shortness, wins one side and loses the other. Matched-length pairs all
    fall in the middle; data_process writes eval/preference_unmatched.jsonl to measure it."""
    sides: dict[str, list[bool]] = {"chosen_longer": [], "similar": [], "chosen_shorter": []}
    for p, c, r in zip(pairs, chosen, rejected, strict=True):
        if p.kind == "degraded_copy":
            continue
        ratio = len(p.chosen) / max(len(p.rejected), 1)
        side = "chosen_longer" if ratio >= LENGTH_RATIO else "chosen_shorter" if ratio <= 1 / LENGTH_RATIO else "similar"
        sides[side].append(c > r)
    split: dict = {k: {"pairs": len(v), "accuracy": sum(v) / len(v) if v else None} for k, v in sides.items()}
    longer, shorter = split["chosen_longer"], split["chosen_shorter"]
    if min(longer["pairs"], shorter["pairs"]) < LENGTH_MIN_PAIRS:
        split["verdict"] = f"too few pairs differ in length (need {LENGTH_MIN_PAIRS} with either reply the longer)"
        return split
    gap = shorter["accuracy"] - longer["accuracy"]
    split["gap"] = gap
    figures = (f"right in {shorter['accuracy']:.0%} of pairs whose chosen reply is the shorter, "
               f"{longer['accuracy']:.0%} where it is the longer")
    split["verdict"] = (f"PAYS FOR SHORTNESS: {figures}" if gap > LENGTH_GAP else
                        f"PAYS FOR LENGTH: {figures}" if gap < -LENGTH_GAP else f"length-neutral: {figures}")
    return split


def pair_report(cfg: EvalConfig, model, tokenizer) -> dict:
    pairs = load_pairs(cfg.pairs, "validation" if Path(cfg.pairs).is_dir() else "train")
    score, prompts = reply_scorer(model, tokenizer, cfg.batch_size, cfg.max_seq_len), [p.prompt for p in pairs]
    chosen, rejected = score(prompts, [p.chosen for p in pairs]), score(prompts, [p.rejected for p in pairs])
    losses = pairwise_reward_loss(torch.tensor(chosen), torch.tensor(rejected)).tolist()
    report: dict = {"pairs": len(pairs), "by_kind": {}}
    for kind in ["all", *sorted({p.kind for p in pairs} - {"all"})]:
        idx = [i for i, p in enumerate(pairs) if kind == "all" or p.kind == kind]
        n = len(idx)
        report["by_kind"][kind] = {
            "pairs": n,
            "accuracy": sum(chosen[i] > rejected[i] for i in idx) / n,
            "reward_chosen": sum(chosen[i] for i in idx) / n,
            "reward_rejected": sum(rejected[i] for i in idx) / n,
            "margin": sum(chosen[i] - rejected[i] for i in idx) / n,
            "loss": sum(losses[i] for i in idx) / n,
        }
    hardest = sorted(range(len(pairs)), key=lambda i: chosen[i] - rejected[i])[:cfg.show]
    report["hardest"] = [{"prompt": pairs[i].prompt, "chosen": pairs[i].chosen, "rejected": pairs[i].rejected,
                          "kind": pairs[i].kind, "margin": chosen[i] - rejected[i]} for i in hardest]
    report["scores"] = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)]
    report["by_length"] = length_split(pairs, chosen, rejected)
    if cfg.probes:
        probed = [p for p in pairs if p.kind not in NOT_PROBED]
        if probed:
            report["hackability"] = hackability(score, [p.prompt for p in probed], [p.chosen for p in probed])
            del report["hackability"]["scores"]  # the chosen side's scores, already in report["scores"]
    print(f"{'kind':<20}{'pairs':>7}{'accuracy':>10}{'chosen':>9}{'rejected':>10}{'margin':>9}{'loss':>8}")
    for kind, m in report["by_kind"].items():
        print(f"{kind:<20}{m['pairs']:>7}{m['accuracy']:>10.4f}{m['reward_chosen']:>9.3f}"
              f"{m['reward_rejected']:>10.3f}{m['margin']:>9.3f}{m['loss']:>8.4f}")
    by_length = report["by_length"]
    print(f"\nby length (chosen longer / similar / shorter, ratio {LENGTH_RATIO}): "
          + " / ".join(f"{m['accuracy']:.3f} ({m['pairs']})" if m["pairs"] else "- (0)"
                       for m in (by_length[k] for k in ("chosen_longer", "similar", "chosen_shorter")))
          + f"; {by_length['verdict']}")
    print(f"\nhardest {len(hardest)} pairs (smallest margin first):")
    for h in report["hardest"]:
        print(f"  margin {h['margin']:+.3f} [{h['kind']}] {h['prompt'][:40]!r}\n"
              f"    chosen:   {h['chosen'][:60]!r}\n    rejected: {h['rejected'][:60]!r}")
    if "hackability" in report:
        print("\n" + format_hackability(report["hackability"], "hackability on the chosen replies"))
    return report


def prompt_report(cfg: EvalConfig, model, tokenizer) -> dict:
    rows = read_jsonl(cfg.prompts)
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise UserError(f"{cfg.prompts}:{i + 1}: needs string fields 'prompt' and 'response'")
    scores = reply_scorer(model, tokenizer, cfg.batch_size, cfg.max_seq_len)([r["prompt"] for r in rows], [r["response"] for r in rows])
    ranked = sorted(({**r, "reward": s} for r, s in zip(rows, scores, strict=True)), key=lambda r: -r["reward"])
    print(f"{len(rows)} rows, mean reward {sum(scores) / max(len(scores), 1):.4f}")
    for r in ranked:
        print(f"{r['reward']:+8.3f}  {r['prompt'][:30]!r} -> {r['response'][:60]!r}")
    return {"rows": len(rows), "mean_reward": sum(scores) / max(len(scores), 1), "scored": ranked}


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(EvalConfig, argv, prog="step2_reward_model/rw_eval.py")
    model = load_reward_model(cfg.model).eval()
    tokenizer = load_tokenizer_dir(cfg.model, "--model")
    report = pair_report(cfg, model, tokenizer) if cfg.pairs else prompt_report(cfg, model, tokenizer)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
