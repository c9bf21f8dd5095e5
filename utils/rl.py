"""The math of PPO for language models, as small pure functions (step3 PPO uses all of them).

Shapes: B rows, R response positions. `mask` (B, R) is 1 on real response tokens (the reply and its end
marker) and 0 on padding after them; every row's real tokens come first. Token t of the response is the
action taken in state "prompt + response[:t]"; its log-prob and value are read at that state's last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.dist import get_world_size


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the whole batch on all ranks (statistics all-reduced, so
    one process and several give the same result); with shift_mean=False the mean is added back."""
    stats = torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]).double()
    if get_world_size() > 1:
        torch.distributed.all_reduce(stats)
    total, total_sq, count = stats.tolist()
    count = max(count, 1.0)
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0) * count / max(count - 1.0, 1.0)  # unbiased
    out = (x - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return out * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | state_t) for logits (B, R, V) read at each token's state and tokens (B, R).

    Logits are divided by the sampling temperature, so the log-probs are those of the distribution the
    tokens were drawn from (top-k/top-p truncation is not applied, as in TRL and DeepSpeed-Chat)."""
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each position's next-token distribution, (B, R, V) -> (B, R)."""
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logps.exp() * logps).sum(-1)


def kl_penalised_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): -kl_coef * (logp - logp_ref) on every response token, plus the reward
    model's score clipped to [-clip, clip] at the last real token of each row (Ziegler et al. 2019, eq. 2;
    Ouyang et al. 2022, eq. 2). Returns (rewards, per-token KL estimate logp - logp_ref), zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of each row's last real token
    clipped = scores.clamp(-clip, clip).to(rewards.dtype) if clip > 0 else scores.to(rewards.dtype)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), (clipped * (mask.sum(-1) > 0)).unsqueeze(1))
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens only (Schulman et al. 2016, eq. 16):

        delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lam * A_{t+1},
    with V and A zero after a row's last real token. Returns (advantages, returns = A + V), zero on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over real tokens of the clipped surrogate loss (Schulman et al. 2017, eq. 7, negated):

        ratio = exp(logp - logp_old),  loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps)).
    Also returns sums over tokens of: clipped (the clip was active) and approx_kl, the k3 estimator
    (ratio - 1) - log ratio of KL(old || new) (Schulman 2020, "Approximating KL divergence")."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_sum(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_sum((clipped > unclipped).float(), mask),
                 "approx_kl": masked_sum((ratio - 1.0) - log_ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over real tokens of the clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), with
    V_clip = V_old + clip(V - V_old, -eps, eps) (as in OpenAI baselines' PPO2 and Ziegler et al. 2019)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_sum((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adapted towards `target` (Ziegler et al. 2019, eq. 4):

        e = clip(KL / target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n / horizon)
    with KL the mean sequence KL of the last batch and n its number of sequences. JSON-able for resume."""

    value: float
    target: float = 0.0  # 0: fixed coefficient
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target <= 0:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
