"""Reward models in the ecosystem's form: transformers' LlamaForSequenceClassification with num_labels=1 and
pad_token_id set, so AutoModelForSequenceClassification loads them. Shared by step2 (training, rw_eval)
and step3 (the frozen reward model and the critic)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from utils.errors import UserError
from utils.model import check_model_dir


def create_reward_model(base_dir: str | Path, pad_token_id: int, seed: int):
    """A reward model from a causal-LM export (SFT or pretrained): its transformer plus a new scalar head
    initialised N(0, 1/(hidden+1)) (small, so first scores sit near 0)."""
    from transformers import AutoModelForSequenceClassification

    check_model_dir(base_dir, "causal_lm")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=1, pad_token_id=pad_token_id, dtype=torch.float32, trust_remote_code=False,
        use_safetensors=True)
    hidden = model.config.hidden_size
    torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(hidden + 1))
    return model


def load_reward_model(path: str | Path):
    """A reward model exported by step2 (a UserError for any other kind of model dir)."""
    from transformers import AutoModelForSequenceClassification

    config = check_model_dir(path, "reward")
    if config.get("num_labels", len(config.get("id2label", {}) or {0: 0})) != 1:
        raise UserError(f"{path}: a sequence classifier with more than one label is not a reward model")
    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32,
                                                              trust_remote_code=False, use_safetensors=True)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row, (B, T) -> (B,): the head's output at the last real token.

    transformers' sequence classifier pools at the last token that is not pad_token_id, which is the
    last real token for right- and left-padded rows alike (pad ids only ever appear as padding).
    """
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float()


@torch.no_grad()
def score_sequences(model, pad_token_id: int, sequences: list[list[int]], batch_size: int) -> list[float]:
    """Reward of each token sequence, scored in right-padded batches."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        scores += sequence_rewards(model, ids.to(device), mask.to(device)).tolist()
    return scores


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head (`score`) of a reward model, also inside a peft or DeepSpeed wrapper."""
    for name, module in model.named_modules():
        if name == "score" or name.endswith(".score"):
            return module
    raise UserError(f"{type(model).__name__} has no 'score' head: not a reward model")


def token_values(model, head: torch.nn.Module, **inputs) -> torch.Tensor:
    """The head's output at every position, (B, T): a critic's per-token values. The forward runs through
    `model` itself (so DeepSpeed's hooks and autograd see it) and a hook catches the head's output before
    transformers pools it at the last token."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured[0].squeeze(-1).float()
