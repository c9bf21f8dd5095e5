"""Model presets (LLaMA-style, on transformers' LlamaConfig), loading with checks, LoRA, and size/FLOPs.

Presets, with an 8k vocabulary and tied embeddings (parameters counted once):
  nano   hidden 64,  4 heads, 2 layers   ~0.6M   tests
  tiny   hidden 256, 4 heads, 4 layers   ~5.3M   the CPU demo
  small  hidden 512, 8 heads, 6 layers   ~23M
  base   hidden 768, 12 heads, 12 layers ~110M   (with a 32k vocab: the 0.1B scale of from-scratch projects)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from utils.errors import UserError, read_json_file
from utils.tokenizer import load_tokenizer_dir

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
}

# What each step expects to find in a model dir, by the `architectures` entry of its config.json.
KINDS = {
    "causal_lm": ("ForCausalLM", "a causal language model (step1 pretrain/SFT or step3 export)"),
    "reward": ("ForSequenceClassification", "a reward model (step2 export)"),
}


def preset_config(preset: str, vocab_size: int, max_position_embeddings: int = 2048, **overrides: Any):
    """A LlamaConfig for a named preset with the tokenizer's vocabulary size."""
    if preset not in PRESETS:
        raise UserError(f"--preset={preset!r} is invalid: choose one of {', '.join(PRESETS)}")
    # no token ids: LlamaConfig's defaults (bos 1, eos 2) name other tokens of our vocabularies; the export
    # writes the tokenizer's (utils.checkpoint.set_special_token_ids)
    kwargs = dict(PRESETS[preset], vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=None,
                  eos_token_id=None)
    kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# The fix for a file of a model dir that does not parse: it was damaged after it was written.
REDO_MODEL = ("the file is damaged (an interrupted copy or export?): copy the dir again from where it was made, or "
              "rerun the step that exported it")


def check_model_dir(path: str | Path, expect: str) -> dict[str, Any]:
    """Make sure `path` is a model dir that loads and holds the kind of model this step needs, before any
    work is done: every loader goes through here, so a bad dir is one error line, never a traceback.

    Raises UserError for a missing dir/config, a config.json that does not parse or is not a transformers
    config, a model from the wrong step (a reward model where a causal LM is expected, or the reverse), and
    missing, pickled-only, cut-off or damaged safetensors weights. Returns the parsed config.json.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json: pass a Hugging Face model dir (a step's final/ dir)")
    config = read_json_file(config_file, REDO_MODEL)
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: holds a JSON {type(config).__name__}, not an object of model settings: "
                        f"{REDO_MODEL}")
    if config.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{config_file}: model_type {config.get('model_type')!r} is not one transformers knows: "
                        f"{REDO_MODEL}")
    suffix, description = KINDS[expect]
    architectures = config.get("architectures") or []
    if not any(arch.endswith(suffix) for arch in architectures):
        found = ", ".join(architectures) or "no architectures entry"
        kinds = [desc for suf, desc in KINDS.values() if any(a.endswith(suf) for a in architectures)]
        if kinds:
            found += f", {kinds[0]}"
        raise UserError(f"{path}: holds {found}, but this step needs {description}")
    check_weights(directory)
    return config


def check_weights(directory: Path) -> None:
    """Every safetensors file of a model dir is whole: its header parses and its size is what the header
    says (a copy cut short fails here, not as a traceback inside from_pretrained)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise UserError(f"{directory}: no .safetensors weights{' (only ' + ', '.join(pickled) + ')' if pickled else ''}"
                        ": weights are read only from safetensors, never unpickled; convert a model you trust with "
                        "AutoModel.from_pretrained(dir).save_pretrained(dir)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as err:
            raise UserError(f"{file}: not a whole safetensors file ({err}): {REDO_MODEL}") from None


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM saved by a previous step (weights from safetensors, no remote code)."""
    check_model_dir(path, "causal_lm")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False,
                                                use_safetensors=True)


def create_causal_lm(preset: str, vocab_size: int, max_position_embeddings: int, seed: int):
    """A freshly initialised preset model (deterministic for a seed)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(preset_config(preset, vocab_size, max_position_embeddings))


def check_vocab(model_vocab: int, tokenizer_len: int, where: str) -> None:
    """Fail when the tokenizer can produce ids the model's embedding does not have."""
    if tokenizer_len > model_vocab:
        raise UserError(f"{where}: tokenizer has {tokenizer_len} tokens but the model's vocabulary is "
                        f"{model_vocab}: use the tokenizer the model was trained with")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once even when tied (embedding and LM head share one matrix)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        # under ZeRO-3 the local tensor is a shard; ds_numel is the full size
        total += getattr(p, "ds_numel", p.numel())
    return total


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention scores.

    Kaplan et al. 2020 (Scaling Laws, eq. 2.1 with the backward pass) / PaLM appendix B, as in nanoGPT.
    """
    return 6.0 * n_params + 12.0 * num_layers * hidden_size * seq_len


def apply_lora(model: torch.nn.Module, dim: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap `model` with peft LoRA adapters on `target_modules`; only the adapters train."""
    from peft import LoraConfig, get_peft_model  # peft takes seconds to import: only with LoRA

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise UserError(f"--lora_module_name: {', '.join(missing)} not found in the model "
                        f"(it has e.g. {', '.join(sorted(present - {''})[:8])})")
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none")
    return get_peft_model(model, config)


def merge_lora_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into the base weights of a peft state dict and strip peft's prefixes.

    W' = W + scale * B @ A  (Hu et al. 2021, LoRA, eq. 3), for every `*.base_layer.weight` that has
    `lora_A.default.weight` / `lora_B.default.weight` siblings.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{module}.lora_A.default.weight")
            b = state.get(f"{module}.lora_B.default.weight")
            if a is not None and b is not None and key.endswith("weight"):
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
        merged[name] = value
    return merged


def load_for_inference(path: str | Path):
    """Model (eval mode; on the GPU in bf16/fp16 if there is one) and tokenizer of an exported causal-LM dir,
    for chat.py, serve.py and make_pairs.py."""
    model = load_causal_lm(path).eval()
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return model, load_tokenizer_dir(path, "--model")
