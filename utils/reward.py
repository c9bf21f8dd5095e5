"""Reward models in the ecosystem's form: transformers' sequence classifier (LlamaForSequenceClassification,
Qwen2ForSequenceClassification, ...) with num_labels=1 and pad_token_id set, so
AutoModelForSequenceClassification loads them. Shared by step2 (training, rw_eval) and step3 (the frozen
reward model and the critic).

The reward of a row is read at its last attention-mask position (`sequence_rewards`), not where
transformers' own pooling looks (the last token that is not pad_token_id): with the pad id also a real
token (Qwen2.5's <|endoftext|>, or eos standing in for a missing pad token, utils.tokenizer) that pooling
would skip a reply that ends with it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from utils.chat import render_response
from utils.errors import UserError
from utils.model import check_model_dir


def create_reward_model(base_dir: str | Path, pad_token_id: int, seed: int):
    """A reward model from a causal-LM export (SFT or pretrained): its transformer plus a new scalar head
    initialised N(0, 1/(hidden+1)) (small, so first scores sit near 0)."""
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
    config = check_model_dir(path, "reward")
    if config.get("num_labels", len(config.get("id2label", {}) or {0: 0})) != 1:
        raise UserError(f"{path}: a sequence classifier with more than one label is not a reward model")
    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32,
                                                              trust_remote_code=False, use_safetensors=True)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): each row's last position whose mask is 1, the reply's last token for right-padded
    rows, left-padded rows and PPO's left-padded prompt + right-padded reply alike (0 for an empty row).
    Equivalent to: max(j for j in range(T) if attention_mask[b, j])."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar reward of each row, (B, T) -> (B,): the head's output at the last real token (last_token_index),
    whatever the pad id is. `model` may be wrapped (peft, DeepSpeed)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    values = token_values(model, score_head(model), **inputs)  # (B, T)
    return values.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def reply_scorer(model, tokenizer, batch_size: int, max_len: int | None = None):
    """score(prompts, replies) -> the reward model's score of each exchange (utils.chat.render_response)."""
    def score(prompts: list[str], replies: list[str]) -> list[float]:
        seqs = [render_response(tokenizer, p, r, max_len) for p, r in zip(prompts, replies, strict=True)]
        return score_sequences(model, tokenizer.pad_token_id, seqs, batch_size)
    return score


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
