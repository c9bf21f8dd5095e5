"""The switch between generating with a trained model and training it (step3 PPO's actor).

PPO alternates: sample replies with the current actor, then train it on them. Generation wants eval mode,
a KV cache and whole weights; training wants train mode and, under ZeRO-3, partitioned weights. One class
owns the switch, with two paths:

- DeepSpeed's Hybrid Engine (`--enable_hybrid_engine` on CUDA, a model with a DeepSpeed inference policy
  such as LLaMA, no peft adapters): the engine is built with the config's `hybrid_engine` section and its
  own `generate` swaps in inference kernels and gathers ZeRO-3 weights once per generation.
- Our own path everywhere else (CPU, where the Hybrid Engine's kernels do not run; peft models): eval mode,
  HF generate with its KV cache, then train mode again. Under ZeRO-3 the weights are gathered *once per
  generation* into a plain copy of the model that generates without any collective, instead of
  re-gathering every layer on every decoding step (DeepSpeed-Chat users report 72 s vs 0.8 s for that).
  Each rank then samples its own prompts independently. LoRA adapters are merged into the copy.
"""

from __future__ import annotations

import logging
import time

import torch

from utils.engine import full_state_dict
from utils.generation import SamplingConfig, sample_tokens
from utils.model import merge_lora_state_dict

log = logging.getLogger(__name__)


def hybrid_engine_section(max_out_tokens: int) -> dict:
    """The `hybrid_engine` section of the actor's DeepSpeed config (DeepSpeed-Chat's values)."""
    return {"enabled": True, "max_out_tokens": max_out_tokens, "inference_tp_size": 1,
            "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8}


def hybrid_engine_supported(model: torch.nn.Module, want: bool) -> tuple[bool, str]:
    """Whether DeepSpeed's Hybrid Engine can run `model` here, and why not."""
    if not want:
        return False, "--enable_hybrid_engine is off"
    if not torch.cuda.is_available():
        return False, "DeepSpeed's Hybrid Engine needs CUDA inference kernels"
    if hasattr(model, "peft_config"):
        return False, "the Hybrid Engine fuses only DeepSpeed-Chat's own LoRA layers, not peft adapters"
    # CUDA only: DeepSpeed's inference policies
    from deepspeed.module_inject.replace_policy import replace_policies

    layers = set()
    for policy in replace_policies:
        orig = getattr(policy, "_orig_layer_class", None)
        layers.update(orig if isinstance(orig, list) else [orig] if orig is not None else [])
    if not any(type(m) in layers for m in model.modules()):
        return False, f"DeepSpeed has no inference policy for {type(model).__name__}"
    return True, "CUDA and a supported model"


def merged_weights(model: torch.nn.Module, zero_stage: int, lora_scale: float | None) -> dict[str, torch.Tensor]:
    """The whole state dict of the plain model on every rank, LoRA adapters folded in when `lora_scale` is set
    (what the generation copy and the EMA of the actor hold)."""
    state = full_state_dict(model, zero_stage)
    return merge_lora_state_dict(state, lora_scale) if lora_scale is not None else state


class GenerationSwitch:
    """Generates with a training engine's current weights and returns it to training afterwards."""

    def __init__(self, engine, tokenizer, zero_stage: int, use_hybrid_engine: bool, lora_scale: float | None):
        self.engine, self.tokenizer, self.zero_stage = engine, tokenizer, zero_stage
        self.use_hybrid_engine, self.lora_scale = use_hybrid_engine, lora_scale
        self._copy: torch.nn.Module | None = None
        self.seconds = 0.0  # time spent generating, for the generation share

    @property
    def path(self) -> str:
        if self.use_hybrid_engine:
            return "deepspeed-hybrid-engine"
        return "own (weights gathered once per generation)" if self.zero_stage == 3 else "own"

    def _generation_model(self) -> torch.nn.Module:
        """The module that generates: the engine's own module, or under ZeRO-3 a plain copy refreshed with
        the gathered (and LoRA-merged) weights."""
        module = self.engine.module
        if self.zero_stage != 3:
            return module
        state = merged_weights(module, self.zero_stage, self.lora_scale)
        if self._copy is None:
            base = module.get_base_model() if hasattr(module, "get_base_model") else module
            self._copy = type(base)(base.config).to(self.engine.device).eval()
        self._copy.load_state_dict(state, strict=False)
        return self._copy

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig,
                 group_size: int = 1) -> torch.Tensor:
        """(B * group_size, N) sampled tokens after the left-padded prompts (pad id after a row's stop
        token), group_size consecutive rows per prompt (utils.generation.sample_tokens)."""
        start = time.perf_counter()
        self.engine.eval()
        try:
            if self.use_hybrid_engine:
                out = sample_tokens(self.engine, ids, mask, sampling, self.tokenizer, group_size=group_size)
            else:
                out = sample_tokens(self._generation_model(), ids, mask, sampling, self.tokenizer,
                                    group_size=group_size)
        finally:
            self.engine.train()
        self.seconds += time.perf_counter() - start
        return out
