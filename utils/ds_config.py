"""Builder for DeepSpeed JSON configs: training engines (ZeRO 0-3, offload, precision, clipping,
TensorBoard monitor, hybrid engine) and inference-only engines for frozen models (step3's reference
and reward models)."""

from __future__ import annotations

from typing import Any

from utils.dist import Precision


def _precision_section(precision: Precision) -> dict[str, Any]:
    # On CPU weights stay fp32 and the training loop autocasts; DeepSpeed's bf16/fp16 sections keep
    # low-precision weights with fp32 master copies, which is what CUDA wants.
    if precision.deepspeed == "bf16":
        return {"bf16": {"enabled": True}}
    if precision.deepspeed == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                         "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
    return {}


def _zero_section(stage: int, offload: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if offload and stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7,
                    stage3_gather_16bit_weights_on_model_save=False)
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return zero


def train_ds_config(*, micro_batch: int, grad_accum: int, world_size: int, zero_stage: int, offload: bool,
                    precision: Precision, gradient_clipping: float, tensorboard_dir: str | None = None,
                    hybrid_engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a trained model (the optimizer is passed to deepspeed.initialize).

    `hybrid_engine`, when given, is the step3 actor's section, e.g.
    {"enabled": True, "max_out_tokens": 512, "inference_tp_size": 1, "release_inference_cache": False,
    "pin_parameters": True, "tp_gather_partition_size": 8}.
    """
    config: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": _zero_section(zero_stage, offload),
        "zero_allow_untested_optimizer": True,
        # torch's AdamW is the client optimizer on CPU; DeepSpeed's cpu_adam would JIT-compile for ~72 s
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **_precision_section(precision),
    }
    if tensorboard_dir:
        config["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir, "job_name": "deepspeed"}
    if hybrid_engine:
        config["hybrid_engine"] = dict(hybrid_engine)
    return config


def inference_ds_config(*, micro_batch: int, world_size: int, zero_stage: int, offload: bool,
                        precision: Precision) -> dict[str, Any]:
    """The DeepSpeed config of a frozen model: ZeRO-3 partitions (and optionally offloads) its weights,
    lower stages just hold them."""
    zero: dict[str, Any] = {"stage": zero_stage if zero_stage == 3 else 0}
    if zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4)
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": micro_batch * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        **_precision_section(precision),
    }
