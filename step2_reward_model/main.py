"""Step 2: train a pairwise reward model on preference pairs.

Launch (from the repo root or from inside step2_reward_model/ as `main.py`):
    deepspeed --num_gpus 1 step2_reward_model/main.py --model_name_or_path OUT/step1_sft/final \
        --data_path OUT/data/preference --eval_pairs OUT/data/eval/preference.jsonl --output_dir OUT/step2_reward
    python step2_reward_model/main.py ...          (one process, no launcher)
    bash training_scripts/step2.sh
Evaluate an export: python step2_reward_model/rw_eval.py --model OUT/step2_reward/final --pairs FILE

Model: the SFT (or pretrained, or any local Hugging Face causal LM's) export as transformers' sequence classifier
(LlamaForSequenceClassification, ...), num_labels=1, with a fresh scalar head; the reward of a (prompt,
response) is the head's output at the reply's end-of-turn token (<|im_end|> in ChatML), read at the last
attention-mask position whatever the pad id (utils.reward).
Loss: -log sigmoid(r_chosen - r_rejected - margin) (+ optional centring), chosen and rejected rows in one
forward (utils.losses.pairwise_reward_loss). Evaluation: accuracy (r_chosen > r_rejected), mean scores,
margin and loss on the held-out pairs, overall and per pair kind. Training loop, ZeRO, LoRA, checkpoints
and resume are the shared ones (utils.trainer); the export in final/ loads with
AutoModelForSequenceClassification.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.config import TrainConfig, option, require
from utils.data import sharded_eval_batches
from utils.dist import get_world_size
from utils.errors import main_guard
from utils.losses import pairwise_reward_loss
from utils.preference import PairCollator, encode_pairs, load_pairs
from utils.reward import create_reward_model, sequence_rewards
from utils.step import load_tokenizer, prepare_model, start, train_and_export
from utils.trainer import LossOutput

log = logging.getLogger("step2")


@dataclass
class Step2Config(TrainConfig):
    """Step 2: pairwise reward model (DeepSpeed ZeRO)."""

    eval_pairs: str = option("", "Extra held-out pairs (JSONL) scored at every evaluation, e.g. data/eval/preference.jsonl.")
    center_rewards_coefficient: float = option(0.0, "Weight of (r_chosen + r_rejected)^2, keeping scores near 0.")
    use_margin: bool = option(True, "Subtract each pair's 'margin' field (when present) inside the sigmoid.")

    def validate(self) -> None:
        super().validate()
        require(bool(self.model_name_or_path), "model_name_or_path", self.model_name_or_path,
                "give the SFT export (OUT/step1_sft/final) the reward model starts from")
        require(bool(self.data_path), "data_path", self.data_path, "give data_process's preference/ dir")
        require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient",
                self.center_rewards_coefficient, "must be >= 0")


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (P,), from one forward over the 2P rows of a PairCollator batch."""
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # (2P,)
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


class RewardTask:
    """Loss units are pairs; held-out metrics overall and per kind over each evaluation set."""

    def __init__(self, cfg: Step2Config, eval_sets: dict[str, list], collate: PairCollator, kinds: list[str]):
        self.cfg, self.eval_sets, self.collate, self.kinds = cfg, eval_sets, collate, kinds

    def units(self, batch) -> int:
        return int(batch["margin"].shape[0])

    def tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum().item())

    def _losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = pair_rewards(model, batch)
        margin = batch["margin"] if self.cfg.use_margin else None
        return pairwise_reward_loss(chosen, rejected, margin, self.cfg.center_rewards_coefficient), chosen, rejected

    def loss(self, model, batch) -> LossOutput:
        losses, chosen, rejected = self._losses(model, batch)
        diff = (chosen - rejected).detach()
        return LossOutput(losses.sum(), {"accuracy": (diff > 0).sum().item(), "margin": diff.sum().item()})

    def evaluate(self, model, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        result: dict[str, float] = {}
        for name, rows in self.eval_sets.items():
            # per kind: [pairs, correct, loss, chosen, rejected]
            sums = torch.zeros(len(self.kinds), 5, dtype=torch.float64)
            for batch, real in sharded_eval_batches(rows, self.collate, self.cfg.per_device_eval_batch_size,
                                                    self.cfg.eval_batches, device):
                losses, chosen, rejected = self._losses(model, batch)
                if not real:
                    continue
                for i, kind in enumerate(batch["kind"].tolist()):
                    sums[kind] += torch.tensor([1.0, float(chosen[i] > rejected[i]), losses[i].item(),
                                                chosen[i].item(), rejected[i].item()], dtype=torch.float64)
            if get_world_size() > 1:
                torch.distributed.all_reduce(sums)
            prefix = "" if name == "validation" else f"{name}/"
            groups = [("", sums.sum(0))] + [(f"{k}/", sums[i]) for i, k in enumerate(self.kinds) if sums[i, 0] > 0]
            for label, (n, correct, loss, chosen_sum, rejected_sum) in ((g, s.tolist()) for g, s in groups):
                if n == 0:
                    continue
                result.update({f"{prefix}{label}accuracy": correct / n, f"{prefix}{label}loss": loss / n,
                               f"{prefix}{label}reward_chosen": chosen_sum / n,
                               f"{prefix}{label}reward_rejected": rejected_sum / n,
                               f"{prefix}{label}margin": (chosen_sum - rejected_sum) / n})
        return result


@main_guard
def main(argv: list[str] | None = None) -> dict:
    cfg, run_dir, precision, finished = start(Step2Config, argv, "step2_reward_model/main.py")
    if finished is not None:
        return finished
    tokenizer = load_tokenizer(cfg)
    train_pairs = load_pairs(cfg.data_path, "train")
    eval_pairs = {"validation": load_pairs(cfg.data_path, "validation", required=False)}
    if cfg.eval_pairs:
        eval_pairs["eval"] = load_pairs(cfg.eval_pairs, "train")
    kinds = sorted({p.kind for pairs in [train_pairs, *eval_pairs.values()] for p in pairs})
    sources = {"train": f"--data_path {cfg.data_path} (train)", "validation": f"--data_path {cfg.data_path} (validation)",
               "eval": f"--eval_pairs {cfg.eval_pairs}"}
    train = encode_pairs(train_pairs, tokenizer, cfg.max_seq_len, kinds, cfg.long_inputs, sources["train"])
    eval_sets = {name: encode_pairs(p, tokenizer, cfg.max_seq_len, kinds, cfg.long_inputs, sources[name])
                 for name, p in eval_pairs.items() if p}
    collate = PairCollator(tokenizer.pad_token_id)
    model = create_reward_model(cfg.model_name_or_path, tokenizer.pad_token_id, cfg.seed)
    model = prepare_model(model, cfg, tokenizer, always_train=("score",))  # the new head trains under LoRA too
    return train_and_export(cfg, run_dir, model, tokenizer, train, collate, RewardTask(cfg, eval_sets, collate, kinds),
                            precision, "reward model", extra={"step": "reward", "kinds": kinds})


if __name__ == "__main__":
    main()
