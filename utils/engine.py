"""Optimizer, learning-rate schedule and deepspeed.initialize for a trained model."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import deepspeed
import torch

from utils.dist import Precision, get_world_size, is_rank0
from utils.ds_config import inference_ds_config, train_ds_config


def lr_lambda(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup` steps, then cosine or linear decay to `min_ratio` at `total`, or constant.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave norms, biases and other 1-D parameters undecayed (as in GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    offload: bool) -> torch.optim.Optimizer:
    """torch AdamW, fused (one kernel per parameter group instead of a dozen small ops per tensor; on CPU
    too, as transformers' Trainer does); DeepSpeed's CPU Adam only for CUDA training with optimizer offload."""
    groups = param_groups(model, weight_decay)
    if torch.cuda.is_available() and offload:
        # CUDA with optimizer offload only: loads a compiled op
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def init_engine(model: torch.nn.Module, cfg: Any, precision: Precision, total_steps: int,
                tensorboard_dir: str | None = None, hybrid_engine: dict[str, Any] | None = None):
    """Wrap a model for training: returns the DeepSpeed engine (optimizer and schedule inside).

    `cfg` is a utils.config.TrainConfig (or a step config extending it).
    """
    optimizer = build_optimizer(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), offload=cfg.offload)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, warmup=cfg.num_warmup_steps, total=total_steps,
                               kind=cfg.lr_scheduler_type, min_ratio=cfg.min_lr_ratio),
    )
    ds_config = train_ds_config(
        micro_batch=cfg.per_device_train_batch_size, grad_accum=cfg.gradient_accumulation_steps,
        world_size=get_world_size(), zero_stage=cfg.zero_stage, offload=cfg.offload, precision=precision,
        gradient_clipping=cfg.gradient_clipping, tensorboard_dir=tensorboard_dir, hybrid_engine=hybrid_engine,
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if cfg.zero_stage == 0 and get_world_size() == 1:
        # one process has nothing to average: skip the all-reduce, which copies every gradient into flat
        # buckets and back after each backward
        engine.enable_backward_allreduce = False
    return engine


def frozen_engine(model, micro_batch: int, zero_stage: int, offload: bool, precision: Precision):
    """A model that only runs forward (reference, reward model) as a DeepSpeed inference engine."""
    ds = inference_ds_config(micro_batch=micro_batch, world_size=get_world_size(), zero_stage=zero_stage,
                             offload=offload, precision=precision)
    engine, *_ = deepspeed.initialize(model=model.eval(), config=ds)
    return engine


def full_state_dict(model: torch.nn.Module, zero_stage: int, rank0_fp32_cpu: bool = False,
                    ) -> dict[str, torch.Tensor] | None:
    """Detached copies of the model's whole state dict, ZeRO-3 partitions gathered once (all ranks call it):
    on every rank as they are, or with `rank0_fp32_cpu` in fp32 on the CPU of rank 0 only (None elsewhere),
    as an export writes them."""
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) if zero_stage == 3
              else contextlib.nullcontext())
    with gather:
        if not rank0_fp32_cpu:
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()} if is_rank0() else None
