"""Losses as small pure functions: tensors and masks in, a scalar (plus metrics) out.

Shapes: B batch, T sequence length, V vocabulary. Label value -100 marks positions without loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_left(x: torch.Tensor, fill: float = IGNORE_INDEX) -> torch.Tensor:
    """labels (or per-token weights) (B, T) moved one left, `fill` in the last column: position t then holds
    what its logits score. Shifting the labels rather than slicing the logits avoids a (B, T-1, V) copy of
    the logits and of their gradient."""
    return F.pad(x[:, 1:], (0, 1), value=fill)


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions whose label is not -100, each times weights[b, t+1]
    when `weights` (B, T) is given.

    logits (B, T, V) predict labels shifted by one: position t is scored against labels[:, t + 1].
    Returns a scalar; exactly 0 (with grad) when every label is masked, never NaN.
    Equivalent to: sum over b, t < T-1 with labels[b, t+1] != -100 of
    w[b, t+1] * -log softmax(logits[b, t])[labels[b, t+1]], with w = 1 without weights.
    """
    shift_labels = shift_left(labels).reshape(-1)  # (B*T,)
    flat_logits = logits.float().reshape(-1, logits.size(-1))  # (B*T, V)
    if weights is None:
        return F.cross_entropy(flat_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    per_token = F.cross_entropy(flat_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_token * shift_left(weights.float(), 0.0).reshape(-1)).sum()


def scored_positions(labels: torch.Tensor, weights: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Which positions' logits score a label: keep (B, T) bool, True at t where labels[b, t+1] != -100; the
    labels they score, (N,) in row-major order (the order of hidden_states[keep]); and weights[b, t+1] there.

    Handing `keep` to the model as transformers' `logits_to_keep` runs the LM head and the softmax on those
    N positions only (prompts, system turns and padding skip them); token_loss_sum then gives exactly
    next_token_loss_sum on the full logits.
    """
    shift_labels = shift_left(labels)  # (B, T)
    keep = shift_labels != IGNORE_INDEX
    shift_weights = None if weights is None else shift_left(weights.float(), 0.0)[keep]
    return keep, shift_labels[keep], shift_weights


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of cross-entropies of logits (N, V) against targets (N,), each times weights (N,) when given.
    Exactly 0 (with grad) when N = 0."""
    if weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()


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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token log-probs over label tokens, and their count, per row: (B, T, V), (B, T) -> (B,), (B,).

    Position t scores labels[:, t + 1]; -100 labels (prompt, template, padding) contribute nothing.
    Equivalent to: for each row b, sum over t with labels[b, t+1] != -100 of log_softmax(logits[b, t])[labels[b, t+1]].
    """
    shift_labels = shift_left(labels)  # (B, T)
    token_logps = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)  # 0 if ignored
    return token_logps.sum(-1), (shift_labels != IGNORE_INDEX).sum(-1)


def dpo_sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) on h = (log pi_c - log ref_c) - (log pi_r - log ref_r), shape (P,).

    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps > 0 is conservative DPO (cDPO,
    Mitchell 2023: preferences assumed flipped with probability eps). eps = 0 is plain DPO.
    """
    return (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
            - label_smoothing * F.logsigmoid(-beta * logits))


def ipo_loss(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17): (h - 1/(2 beta))^2, shape (P,)."""
    return (logits - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_len: torch.Tensor,
               rejected_len: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised, shape (P,):
    -log sigmoid(beta/|y_c| log pi(y_c) - beta/|y_r| log pi(y_r) - gamma)."""
    chosen = beta * chosen_logps / chosen_len.clamp(min=1)
    rejected = beta * rejected_logps / rejected_len.clamp(min=1)
    return -F.logsigmoid(chosen - rejected - gamma)


def preference_loss(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, chosen_len: torch.Tensor,
                    rejected_len: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                    gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and implicit rewards (chosen, rejected), each (P,), for loss_type dpo|cdpo|ipo|simpo.

    Rewards are beta * (log pi - log ref) (Rafailov et al. 2023, eq. 5); for SimPO, beta times the
    length-normalised log-prob.
    """
    if loss_type == "simpo":
        loss = simpo_loss(policy_chosen, policy_rejected, chosen_len, rejected_len, beta, gamma)
        chosen_rewards = beta * policy_chosen / chosen_len.clamp(min=1)
        rejected_rewards = beta * policy_rejected / rejected_len.clamp(min=1)
        return loss, chosen_rewards.detach(), rejected_rewards.detach()
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        loss = ipo_loss(h, beta)
    elif loss_type in ("dpo", "cdpo"):
        loss = dpo_sigmoid_loss(h, beta, label_smoothing if loss_type == "cdpo" else 0.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()
