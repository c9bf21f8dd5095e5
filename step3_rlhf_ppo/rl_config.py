"""The options step 3's on-policy paths share (PPO in main.py, the group-relative family in grpo.py): the
actor and its reference, prompts, generation and mini-batches, sampling, the actor's optimiser, DeepSpeed
and LoRA. Each path adds its own; the actor's (and PPO's critic's) single-model options are handed to
utils.engine as one TrainConfig by `role`. Flags keep DeepSpeed-Chat's names.
"""

from __future__ import annotations

from dataclasses import dataclass

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

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RLConfig(RunConfig):
    # models
    actor_model_name_or_path: str = option("", "The SFT export the actor (trained) and the reference (frozen) start from.")
    tokenizer_path: str = option("", "Tokenizer dir; defaults to the actor's.")
    # data
    data_path: str = option("", "Prompts: data_process's prompts/ dir or a .jsonl of {\"prompt\"} rows.")
    max_prompt_seq_len: int = option(128, "Longest prompt in tokens (chat template included).")
    long_inputs: str = option("truncate", "Prompts longer than --max_prompt_seq_len: leave them out (a warning counts "
                                          "them; 'truncate' as in the other steps) or reject the data (exit 2).",
                              choices=LONG_INPUTS)
    max_answer_seq_len: int = option(64, "Most tokens sampled per reply.")
    # batches
    per_device_generation_batch_size: int = option(8, "Prompts per process sampled for each RL step.")
    per_device_training_batch_size: int = option(8, "Rows per process in each mini-batch.")
    gradient_accumulation_steps: int = option(1, "Mini-batches accumulated per optimizer step.")
    ppo_epochs: int = option(1, "Passes over each batch of experience.")
    num_train_epochs: int = option(1, "Passes over the prompts (ignored when --max_steps > 0).")
    max_steps: int = option(0, "RL steps (experience batches) to run; 0 = num_train_epochs passes.")
    per_device_eval_batch_size: int = option(16, "Held-out prompts per process sampled together.")
    # sampling
    temperature: float = option(1.0, "Sampling temperature (log-probs use the same temperature).")
    top_k: int = option(0, "Sample from the k most likely tokens (0 = all).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    # optimisation
    actor_learning_rate: float = option(1e-5, "Actor peak learning rate.")
    actor_weight_decay: float = option(0.0, "Actor AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    lr_scheduler_type: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    num_warmup_steps: int = option(0, "Linear warmup (optimizer steps).")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of the peak.")
    gradient_clipping: float = option(1.0, "Clip each model's global gradient norm (0 = off).")
    # DeepSpeed
    actor_zero_stage: int = option(0, "ZeRO stage of the actor (and the reference).", choices=(0, 1, 2, 3))
    offload: bool = option(False, "Offload the trained models' optimizer states to CPU memory (ZeRO >= 1).")
    offload_reference_model: bool = option(False, "Keep the reference's weights in CPU memory (ZeRO-3).")
    enable_hybrid_engine: bool = option(False, "Generate through DeepSpeed's Hybrid Engine (CUDA, LLaMA).")
    actor_gradient_checkpointing: bool = option(False, "Recompute the actor's activations in backward.")
    # LoRA
    actor_lora_dim: int = option(0, "LoRA rank of the actor (0 = train all weights).")
    actor_lora_module_name: list[str] = option(LORA_MODULES, "Actor modules that get LoRA adapters.")
    lora_alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / dim).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    samples_interval: int = option(10, "Write prompts and replies to samples.jsonl every N steps (0 = never).")

    def validate(self) -> None:
        super().validate()
        require(bool(self.actor_model_name_or_path), "actor_model_name_or_path", self.actor_model_name_or_path,
                "give the SFT export (OUT/step1_sft/final)")
        require(bool(self.data_path), "data_path", self.data_path, "give a data_process dir or a .jsonl (see --help)")
        require_positive(self, "max_prompt_seq_len", "max_answer_seq_len", "per_device_generation_batch_size",
                         "per_device_training_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                         "num_train_epochs", "per_device_eval_batch_size")
        require_non_negative(self, "max_steps", "num_warmup_steps", "top_k", "actor_lora_dim", "samples_interval",
                             "actor_weight_decay", "gradient_clipping")
        require(self.actor_learning_rate > 0, "actor_learning_rate", self.actor_learning_rate, "must be > 0")
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "must be in [0, 1)")
        require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        require(not (self.offload_reference_model and self.actor_zero_stage != 3), "offload_reference_model",
                self.offload_reference_model, "offloading the reference's weights needs --actor_zero_stage 3")

    def require_batch_multiple(self, rows_per_prompt: int = 1) -> None:
        """Each batch of experience (generation batch x rows per prompt) splits into whole mini-batches."""
        mini = self.per_device_training_batch_size * self.gradient_accumulation_steps
        rows = self.per_device_generation_batch_size * rows_per_prompt
        require(rows % mini == 0, "per_device_generation_batch_size", self.per_device_generation_batch_size,
                f"x {rows_per_prompt} replies per prompt = {rows} rows must be a multiple of "
                f"per_device_training_batch_size x gradient_accumulation_steps = {mini}")

    def lora_scale(self, name: str) -> float | None:
        """alpha / dim of the actor's or critic's LoRA adapters (None without LoRA): what merging folds in."""
        dim = getattr(self, f"{name}_lora_dim")
        return self.lora_alpha / dim if dim else None

    def role(self, name: str) -> TrainConfig:
        """The single-model training options of the actor (or PPO's critic), for utils.engine/utils.step."""
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
