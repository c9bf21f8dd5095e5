"""Losses as small pure functions: tensors and masks in, a scalar (plus metrics) out.

Shapes: B batch, T sequence length, V vocabulary. Label value -100 marks positions without loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions whose label is not -100.

    logits (B, T, V) predict labels shifted by one: position t is scored against labels[:, t + 1].
    Returns a scalar; exactly 0 (with grad) when every label is masked, never NaN.
    Equivalent to: sum over b, t < T-1 with labels[b, t+1] != -100 of -log softmax(logits[b, t])[labels[b, t+1]].
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def count_label_tokens(labels: torch.Tensor) -> int:
    """Positions that carry a next-token loss (the units next_token_loss_sum sums over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def pairwise_reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss of a reward model (Bradley-Terry), shape (P,) from scores of shape (P,).

    loss = -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2
    InstructGPT (Ouyang et al. 2022, eq. 1); the per-pair margin of Llama 2 (Touvron et al. 2023, eq. 2);
    the centring term keeps scores near 0 (Eisenstein et al. 2023, "Helping or Herding").
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss
