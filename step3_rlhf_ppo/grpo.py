"""Step 3, third path: RL from verifiable rewards with group-relative policy gradients (GRPO, Dr. GRPO,
RLOO, REINFORCE++) and pluggable reward functions. No critic, no reward model to train.

Launch (from the repo root, or from inside step3_rlhf_ppo/ as `grpo.py`):
    deepspeed --num_gpus 1 step3_rlhf_ppo/grpo.py --actor_model_name_or_path OUT/step1_sft/final \
        --data_path OUT/data/rl --eval_data OUT/data/eval/t1_sentiment.jsonl --output_dir OUT/step3_grpo
    python step3_rlhf_ppo/grpo.py ...           (one process, no launcher)
    bash training_scripts/step3_grpo.sh [ACTOR_MODEL_PATH ACTOR_ZERO_STAGE OUTPUT]

Rows are {"prompt", "reference", "task", ...} (data_process's rl/ dir or a .jsonl; extra fields reach the
reward functions). Every step samples --num_generations replies per prompt, scores them with
--reward_funcs (utils.rewards), turns each group's rewards into advantages (--advantage_estimator) and
trains the actor on the clipped surrogate (grpo_trainer.py has the step, utils.rl the math). Outputs:
final/ (the actor), metrics.jsonl + tb/, samples.jsonl, checkpoints/ (resumable).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step3_rlhf_ppo.rl_config import RLConfig
from utils.config import option, require, require_non_negative, require_positive
from utils.errors import main_guard
from utils.rl import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS


@dataclass
class GRPOConfig(RLConfig):
    """Step 3: GRPO-family RL of the SFT actor on verifiable rewards (DeepSpeed ZeRO, DeepSpeed-Chat flags)."""

    data_path: str = option("", "Rows {prompt, reference, task}: data_process's rl/ dir or a .jsonl.")
    eval_data: list[str] = option([], "Held-out rows (.jsonl files, same fields; several are taken in turn): "
                                      "greedy replies scored at every evaluation.")
    reward_funcs: list[str] = option(["task"], "Reward functions: task, rm:DIR, length, min_length:N, "
                                               "repetition, python:FILE.py:FUNC (utils/rewards.py).")
    reward_weights: list[float] = option([], "One weight per reward function (none: all 1).")
    num_generations: int = option(8, "Replies sampled per prompt (the group size G, >= 2).")
    advantage_estimator: str = option("grpo", "Group advantages: grpo (mean and std), dr_grpo (mean), rloo "
                                              "(leave-one-out mean), reinforce_pp (mean, then global scale).",
                                      choices=ADVANTAGE_ESTIMATORS)
    loss_aggregation: str = option("token_mean", "Loss over tokens: token_mean (DAPO), seq_mean_token_mean "
                                                 "(GRPO), seq_mean_token_sum_norm (Dr. GRPO).",
                                   choices=LOSS_AGGREGATIONS)
    clip_eps_low: float = option(0.2, "Lower ratio clip: ratio >= 1 - eps_low.")
    clip_eps_high: float = option(0.28, "Upper ratio clip: ratio <= 1 + eps_high (DAPO's clip-higher).")
    kl_coef: float = option(0.0, "Weight of the k3 KL to the reference in the loss (0: no reference is built).")
    drop_zero_variance_groups: bool = option(False, "Leave groups whose rewards are all equal out of the loss "
                                                    "and its normaliser (they carry no gradient either way).")
    max_no_signal_steps: int = option(10, "Stop (exit 2) after this many steps in a row in which every group's "
                                          "rewards were all equal.")

    def validate(self) -> None:
        super().validate()
        require(self.num_generations >= 2, "num_generations", self.num_generations,
                "a group needs at least 2 replies to compare (try 8)")
        require_positive(self, "max_no_signal_steps")
        require_non_negative(self, "kl_coef", "clip_eps_low", "clip_eps_high")
        require(self.clip_eps_low < 1, "clip_eps_low", self.clip_eps_low, "must be in [0, 1)")
        self.require_batch_multiple(self.num_generations)

    def model_dirs(self) -> list[tuple[str, str]]:
        rms = [(spec[3:], "reward") for spec in self.reward_funcs if spec.startswith("rm:")]
        return [(self.actor_model_name_or_path, "causal_lm"), *rms]


@main_guard
def main(argv: list[str] | None = None) -> dict:
    from utils.step import start  # importing this module (its config class) loads no DeepSpeed

    cfg, run_dir, precision, finished = start(GRPOConfig, argv, "step3_rlhf_ppo/grpo.py")
    if finished is not None:
        return finished
    # the trainer (models, engines) only for a run that is not finished
    from step3_rlhf_ppo.grpo_trainer import run_grpo

    return run_grpo(cfg, run_dir, precision)


if __name__ == "__main__":
    main()
