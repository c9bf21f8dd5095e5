"""Step 3: PPO of the SFT model against the step 2 reward model (actor, reference, critic, reward model).

Launch (from the repo root, or from inside step3_rlhf_ppo/ as `main.py`):
    deepspeed --num_gpus 1 step3_rlhf_ppo/main.py --actor_model_name_or_path OUT/step1_sft/final \
        --critic_model_name_or_path OUT/step2_reward/final --data_path OUT/data/prompts --output_dir OUT/step3_ppo
    python step3_rlhf_ppo/main.py ...           (one process, no launcher)
    bash training_scripts/step3.sh [ACTOR CRITIC ACTOR_ZERO_STAGE CRITIC_ZERO_STAGE OUTPUT]

Flags keep DeepSpeed-Chat's names. Every PPO step: sample replies to a batch of prompts (utils.hybrid owns
the switch between generating and training), score them (reference log-probs, critic values, reward-model
score), turn them into per-token rewards and GAE advantages, then train actor and critic for --ppo_epochs
passes in mini-batches (utils.rl holds the math). Outputs: final/ (the actor), final_ema/ (with
--enable_ema), critic/, metrics.jsonl + tb/, samples.jsonl, checkpoints/ (both engines, resumable).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step3_rlhf_ppo.rl_config import LORA_MODULES, RLConfig
from utils.config import option, require, require_non_negative, require_positive
from utils.errors import main_guard


@dataclass
class PPOConfig(RLConfig):
    """Step 3: PPO of the SFT actor against the step 2 reward model (DeepSpeed ZeRO, DeepSpeed-Chat flags)."""

    # models
    critic_model_name_or_path: str = option("", "The step 2 reward-model export the critic starts from.")
    reward_model_name_or_path: str = option("", "The frozen reward model; '' = the critic's starting point.")
    # data
    eval_prompts: str = option("", "Held-out prompts (.jsonl) sampled and scored at every evaluation.")
    ptx_data: str = option("", "step0 tokens dir: mix a pretraining loss into the actor's (off when '').")
    ptx_coef: float = option(1.0, "Weight of the pretraining loss (with --ptx_data).")
    # the critic
    critic_learning_rate: float = option(5e-6, "Critic peak learning rate.")
    critic_weight_decay: float = option(0.0, "Critic AdamW weight decay.")
    critic_zero_stage: int = option(0, "ZeRO stage of the critic (and the reward model).", choices=(0, 1, 2, 3))
    critic_gradient_checkpointing: bool = option(False, "Recompute the critic's activations in backward.")
    critic_lora_dim: int = option(0, "LoRA rank of the critic (its value head always trains).")
    critic_lora_module_name: list[str] = option(LORA_MODULES, "Critic modules that get LoRA adapters.")
    # EMA
    enable_ema: bool = option(False, "Keep an exponential moving average of the actor (exported to final_ema/).")
    ema_decay: float = option(0.992, "EMA decay per PPO step.")
    # PPO
    init_kl_coef: float = option(0.1, "KL penalty coefficient beta (its start value when adaptive).")
    target_kl: float = option(0.0, "Adapt beta towards this KL per reply (0 = fixed beta).")
    kl_horizon: int = option(10000, "Horizon of the adaptive KL controller (replies).")
    reward_clip: float = option(5.0, "Clip the reward model's score to +-this value (0 = off).")
    shaping_funcs: list[str] = option([], "Rule rewards added to the reward model's (clipped) score of each reply: "
                                          "length, min_length:N, repetition, python:FILE.py:FUNC (utils/rewards.py); "
                                          "none by default.")
    shaping_weights: list[float] = option([], "One weight per --shaping_funcs entry (none: all 1).")
    cliprange: float = option(0.2, "PPO policy ratio clip epsilon.")
    cliprange_value: float = option(0.2, "Value clip around the old values.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")
    whiten_advantages: bool = option(True, "Normalise advantages to mean 0, std 1 over each experience batch.")
    max_approx_kl: float = option(0.1, "Stop a PPO step's update early once a mini-batch's approx KL exceeds this (0 = off).")
    # checkpoint choice by the held-out replies (--eval_prompts)
    stop_repetition: float = option(0.0, "Stop once the held-out replies' share of repeated 4-grams passes this and "
                                         "export the weights of the last evaluation under it (0 = off).")
    stop_length_ratio: float = option(0.0, "Stop once the held-out replies' mean length falls under this share of "
                                           "the first evaluation's and export the weights of the last evaluation "
                                           "above it (0 = off).")

    def validate(self) -> None:
        super().validate()
        require(bool(self.critic_model_name_or_path), "critic_model_name_or_path", self.critic_model_name_or_path,
                "give the step 2 reward model export (OUT/step2_reward/final)")
        require_positive(self, "kl_horizon")
        require_non_negative(self, "critic_lora_dim", "critic_weight_decay", "init_kl_coef", "target_kl",
                             "reward_clip", "ptx_coef", "max_approx_kl", "stop_repetition", "stop_length_ratio")
        if self.stop_repetition or self.stop_length_ratio:
            flag = "stop_repetition" if self.stop_repetition else "stop_length_ratio"
            require(bool(self.eval_prompts) and self.eval_interval > 0, flag, getattr(self, flag),
                    "needs held-out prompts to judge: give --eval_prompts and an --eval_interval > 0")
            require(self.save_interval % self.eval_interval == 0, "save_interval", self.save_interval,
                    f"with --{flag}, checkpoints must fall on evaluations: use a multiple of --eval_interval "
                    f"{self.eval_interval} (or 0)")
        self.require_batch_multiple()
        for name in ("critic_learning_rate", "cliprange", "cliprange_value"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(0 <= self.gamma <= 1, "gamma", self.gamma, "must be in [0, 1]")
        require(0 <= self.lam <= 1, "lam", self.lam, "must be in [0, 1]")
        require(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in (0, 1), e.g. 0.992")
        require(not (self.offload and min(self.actor_zero_stage, self.critic_zero_stage) == 0), "offload",
                self.offload, "CPU offload needs ZeRO stage 1, 2 or 3 for actor and critic")

    def model_dirs(self) -> list[tuple[str, str]]:
        return [(self.actor_model_name_or_path, "causal_lm"), (self.critic_model_name_or_path, "reward"),
                (self.reward_model_name_or_path or self.critic_model_name_or_path, "reward")]


@main_guard
def main(argv: list[str] | None = None) -> dict:
    from utils.step import start  # importing this module (its config class) loads no DeepSpeed

    cfg, run_dir, precision, finished = start(PPOConfig, argv, "step3_rlhf_ppo/main.py")
    if finished is not None:
        return finished
    # the trainer (models, engines) only for a run that is not finished
    from step3_rlhf_ppo.ppo_trainer import run_ppo

    return run_ppo(cfg, run_dir, precision)


if __name__ == "__main__":
    main()
