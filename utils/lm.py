"""The causal-LM training task (pretraining and SFT): next-token loss over label tokens, and held-out
loss / perplexity / bits per character."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from utils.data import sharded_eval_batches
from utils.dist import all_reduce_sum
from utils.losses import count_label_tokens, scored_positions, token_loss_sum
from utils.trainer import LossOutput


class CausalLMTask:
    """Loss units are label tokens, or the sum of the loss_weights when batches carry them (conversations:
    each conversation's tokens weigh 1/n, utils.chat.with_conversation_weights; or the task weights of
    utils.chat.with_task_weights); `eval_dataset` rows are scored on every eval,
    always per token, so held-out losses compare across weightings.

    `chars_per_token` (characters of text per token in the held-out set) turns the loss in nats/token
    into bits per character, a figure comparable across tokenizers.
    """

    def __init__(self, eval_dataset: Any, collate: Callable, eval_batch_size: int, eval_batches: int,
                 chars_per_token: float | None = None):
        self.eval_dataset, self.collate = eval_dataset, collate
        self.eval_batch_size, self.eval_batches = eval_batch_size, eval_batches
        self.chars_per_token = chars_per_token

    def units(self, batch: dict[str, torch.Tensor]) -> float:
        if "loss_weights" in batch:
            return batch["loss_weights"][:, 1:].sum().item()
        return count_label_tokens(batch["labels"])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum().item()) if mask is not None else batch["input_ids"].numel()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
        keep, targets, weights = scored_positions(batch["labels"], batch.get("loss_weights"))
        # the LM head and the softmax run only where a label is scored (SFT: about a third of the tokens)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (N, V)
        return LossOutput(token_loss_sum(logits, targets, weights))

    def evaluate(self, model: torch.nn.Module, step: int = -1) -> dict[str, float]:
        loss_sum, units = 0.0, 0
        device = next(model.parameters()).device
        for batch, real in sharded_eval_batches(self.eval_dataset, self.collate, self.eval_batch_size,
                                                self.eval_batches, device):
            batch = {k: v for k, v in batch.items() if k != "loss_weights"}  # held-out loss: per token
            out = self.loss(model, batch).loss_sum.item()
            if real:
                loss_sum += out
                units += self.units(batch)
        loss_sum, units = all_reduce_sum(loss_sum), all_reduce_sum(units)
        loss = loss_sum / max(units, 1)
        result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "eval_tokens": units}
        if self.chars_per_token:
            result["bits_per_char"] = loss / math.log(2) / self.chars_per_token
        return result
