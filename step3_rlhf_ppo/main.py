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

from utils.config import (
    LONG_INPUTS,
    SCHEDULERS,
    RunConfig,
    TrainConfig,
    option,
    require,
    require_non_negative,
    require_positive,
)
from utils.errors import main_guard

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PPOConfig(RunConfig):
    """Step 3: PPO of the SFT actor against the step 2 reward model (DeepSpeed ZeRO, DeepSpeed-Chat flags)."""

    # models
    actor_model_name_or_path: str = option("", "The SFT export the actor (trained) and the reference (frozen) start from.")
    critic_model_name_or_path: str = option("", "The step 2 reward-model export the critic starts from.")
    reward_model_name_or_path: str = option("", "The frozen reward model; '' = the critic's starting point.")
    tokenizer_path: str = option("", "Tokenizer dir; defaults to the actor's.")
    # data
    data_path: str = option("", "Prompts: data_process's prompts/ dir or a .jsonl of {\"prompt\"} rows.")
    eval_prompts: str = option("", "Held-out prompts (.jsonl) sampled and scored at every evaluation.")
    ptx_data: str = option("", "step0 tokens dir: mix a pretraining loss into the actor's (off when '').")
    ptx_coef: float = option(1.0, "Weight of the pretraining loss (with --ptx_data).")
    max_prompt_seq_len: int = option(128, "Longest prompt in tokens (chat template included).")
    long_inputs: str = option("truncate", "Prompts longer than --max_prompt_seq_len: leave them out (a warning counts "
                                          "them; 'truncate' as in the other steps) or reject the data (exit 2).",
                              choices=LONG_INPUTS)
    max_answer_seq_len: int = option(64, "Most tokens sampled per reply.")
    # batches
    per_device_generation_batch_size: int = option(8, "Prompts per process sampled for each PPO step.")
    per_device_training_batch_size: int = option(8, "Rows per process in each PPO mini-batch.")
    gradient_accumulation_steps: int = option(1, "Mini-batches accumulated per optimizer step.")
    ppo_epochs: int = option(1, "Passes over each batch of experience.")
    num_train_epochs: int = option(1, "Passes over the prompts (ignored when --max_steps > 0).")
    max_steps: int = option(0, "PPO steps (experience batches) to run; 0 = num_train_epochs passes.")
    per_device_eval_batch_size: int = option(16, "Held-out prompts per process sampled together.")
    # sampling
    temperature: float = option(1.0, "Sampling temperature (log-probs use the same temperature).")
    top_k: int = option(0, "Sample from the k most likely tokens (0 = all).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    # optimisation
    actor_learning_rate: float = option(1e-5, "Actor peak learning rate.")
    critic_learning_rate: float = option(5e-6, "Critic peak learning rate.")
    actor_weight_decay: float = option(0.0, "Actor AdamW weight decay.")
    critic_weight_decay: float = option(0.0, "Critic AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    lr_scheduler_type: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    num_warmup_steps: int = option(0, "Linear warmup (optimizer steps).")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak.")
    gradient_clipping: float = option(1.0, "Clip each model's global gradient norm (0 = off).")
    # DeepSpeed
    actor_zero_stage: int = option(0, "ZeRO stage of the actor (and the reference).", choices=(0, 1, 2, 3))
    critic_zero_stage: int = option(0, "ZeRO stage of the critic (and the reward model).", choices=(0, 1, 2, 3))
    offload: bool = option(False, "Offload actor and critic optimizer states to CPU memory (ZeRO >= 1).")
    offload_reference_model: bool = option(False, "Keep the reference's weights in CPU memory (ZeRO-3).")
    enable_hybrid_engine: bool = option(False, "Generate through DeepSpeed's Hybrid Engine (CUDA, LLaMA).")
    actor_gradient_checkpointing: bool = option(False, "Recompute the actor's activations in backward.")
    critic_gradient_checkpointing: bool = option(False, "Recompute the critic's activations in backward.")
    # LoRA
    actor_lora_dim: int = option(0, "LoRA rank of the actor (0 = train all weights).")
    actor_lora_module_name: list[str] = option(LORA_MODULES, "Actor modules that get LoRA adapters.")
    critic_lora_dim: int = option(0, "LoRA rank of the critic (its value head always trains).")
    critic_lora_module_name: list[str] = option(LORA_MODULES, "Critic modules that get LoRA adapters.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / dim).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    # EMA
    enable_ema: bool = option(False, "Keep an exponential moving average of the actor (exported to final_ema/).")
    ema_decay: float = option(0.992, "EMA decay per PPO step.")
    # PPO
    init_kl_coef: float = option(0.1, "KL penalty coefficient beta (its start value when adaptive).")
    target_kl: float = option(0.0, "Adapt beta towards this KL per reply (0 = fixed beta).")
    kl_horizon: int = option(10000, "Horizon of the adaptive KL controller (replies).")
    reward_clip: float = option(5.0, "Clip the reward model's score to +-this value (0 = off).")
    cliprange: float = option(0.2, "PPO policy ratio clip epsilon.")
    cliprange_value: float = option(0.2, "Value clip around the old values.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")
    whiten_advantages: bool = option(True, "Normalise advantages to mean 0, std 1 over each experience batch.")
    max_approx_kl: float = option(0.1, "Stop a PPO step's update early once a mini-batch's approx KL exceeds this (0 = off).")
    samples_interval: int = option(10, "Write prompts and replies to samples.jsonl every N steps (0 = never).")

    def validate(self) -> None:
        super().validate()
        require(bool(self.actor_model_name_or_path), "actor_model_name_or_path", self.actor_model_name_or_path,
                "give the SFT export (OUT/step1_sft/final)")
        require(bool(self.critic_model_name_or_path), "critic_model_name_or_path", self.critic_model_name_or_path,
                "give the step 2 reward model export (OUT/step2_reward/final)")
        require(bool(self.data_path), "data_path", self.data_path, "give data_process's prompts/ dir or a .jsonl")
        require_positive(self, "max_prompt_seq_len", "max_answer_seq_len", "per_device_generation_batch_size",
                         "per_device_training_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                         "num_train_epochs", "per_device_eval_batch_size", "kl_horizon")
        require_non_negative(self, "max_steps", "num_warmup_steps", "top_k", "actor_lora_dim", "critic_lora_dim",
                             "samples_interval", "actor_weight_decay", "critic_weight_decay", "init_kl_coef",
                             "target_kl", "reward_clip", "ptx_coef", "max_approx_kl", "gradient_clipping")
        mini = self.per_device_training_batch_size * self.gradient_accumulation_steps
        require(self.per_device_generation_batch_size % mini == 0, "per_device_generation_batch_size",
                self.per_device_generation_batch_size, f"must be a multiple of per_device_training_batch_size x "
                f"gradient_accumulation_steps = {mini}")
        for name in ("actor_learning_rate", "critic_learning_rate", "temperature", "cliprange", "cliprange_value"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(0 <= self.gamma <= 1, "gamma", self.gamma, "must be in [0, 1]")
        require(0 <= self.lam <= 1, "lam", self.lam, "must be in [0, 1]")
        require(0 < self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in (0, 1), e.g. 0.992")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        require(not (self.offload and min(self.actor_zero_stage, self.critic_zero_stage) == 0), "offload",
                self.offload, "CPU offload needs ZeRO stage 1, 2 or 3 for actor and critic")
        require(not (self.offload_reference_model and self.actor_zero_stage != 3), "offload_reference_model",
                self.offload_reference_model, "offloading the reference's weights needs --actor_zero_stage 3")

    def model_dirs(self) -> list[tuple[str, str]]:
        return [(self.actor_model_name_or_path, "causal_lm"), (self.critic_model_name_or_path, "reward"),
                (self.reward_model_name_or_path or self.critic_model_name_or_path, "reward")]

    def lora_scale(self, name: str) -> float | None:
        """alpha / dim of the actor's or critic's LoRA adapters (None without LoRA): what merging folds in."""
        dim = getattr(self, f"{name}_lora_dim")
        return self.lora_alpha / dim if dim else None

    def role(self, name: str) -> TrainConfig:
        """The single-model training options of the actor or the critic, for utils.engine/utils.step."""
        return TrainConfig(
            output_dir=self.output_dir, seed=self.seed, dtype=self.dtype,
            per_device_train_batch_size=self.per_device_training_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=getattr(self, f"{name}_learning_rate"), weight_decay=getattr(self, f"{name}_weight_decay"),
            adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2, lr_scheduler_type=self.lr_scheduler_type,
            num_warmup_steps=self.num_warmup_steps, min_lr_ratio=self.min_lr_ratio,
            gradient_clipping=self.gradient_clipping, zero_stage=getattr(self, f"{name}_zero_stage"),
            offload=self.offload, gradient_checkpointing=getattr(self, f"{name}_gradient_checkpointing"),
            lora_dim=getattr(self, f"{name}_lora_dim"), lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            lora_module_name=list(getattr(self, f"{name}_lora_module_name")))


@main_guard
def main(argv: list[str] | None = None) -> dict:
    from utils.step import start

    cfg, run_dir, precision, finished = start(PPOConfig, argv, "step3_rlhf_ppo/main.py")
    if finished is not None:
        return finished
    from step3_rlhf_ppo.ppo_trainer import run_ppo

    return run_ppo(cfg, run_dir, precision)


if __name__ == "__main__":
    main()
