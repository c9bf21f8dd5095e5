"""The math of RL for language models, as small pure functions: PPO's (GAE, clipped policy and value
losses, KL-penalised rewards) and the group-relative family's (group advantages, loss aggregations, k3 KL).

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


def _global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased variance of x over the real tokens of the whole batch on all ranks (statistics
    all-reduced, so one process and several give the same result)."""
    stats = torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]).double()
    if get_world_size() > 1:
        torch.distributed.all_reduce(stats)
    total, total_sq, count = stats.tolist()
    count = max(count, 1.0)
    mean = total / count
    return mean, max(total_sq / count - mean * mean, 0.0) * count / max(count - 1.0, 1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the whole batch on all ranks; with shift_mean=False the
    mean is added back."""
    mean, var = _global_moments(x, mask)
    out = (x - mean) / (var + eps) ** 0.5
    if not shift_mean:
        out = out + mean
    return out * mask


def masked_rescale(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / std over the real tokens of the whole batch on all ranks, not re-centred: REINFORCE++'s global
    normalisation of advantages that a group baseline has already centred (re-centring per token would
    give a group whose rewards are all equal a gradient)."""
    _, var = _global_moments(x, mask)
    return x / (var + eps) ** 0.5 * mask


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
                         mask: torch.Tensor, kl_coef: float, clip: float, bonus: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): -kl_coef * (logp - logp_ref) on every response token, plus the reward
    model's score clipped to [-clip, clip] at the last real token of each row (Ziegler et al. 2019, eq. 2;
    Ouyang et al. 2022, eq. 2), plus `bonus` (B,) there, unclipped (rule rewards: a clipped score must not
    swallow them). Returns (rewards, per-token KL estimate logp - logp_ref), zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of each row's last real token
    clipped = scores.clamp(-clip, clip).to(rewards.dtype) if clip > 0 else scores.to(rewards.dtype)
    if bonus is not None:
        clipped = clipped + bonus.to(rewards.dtype)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), (clipped * (mask.sum(-1) > 0)).unsqueeze(1))
    return rewards, kl


def degeneration(evaluation: dict[str, float], first: dict[str, float], max_repetition: float,
                 min_length_ratio: float) -> str:
    """Why held-out replies count as degenerate, '' when they do not: their share of repeated character
    4-grams (`eval_repetition`) above `max_repetition`, or their mean length in tokens (`eval_length`) under
    `min_length_ratio` x the `first` evaluation's (the one before training). A limit of 0 is off."""
    if max_repetition > 0 and evaluation["eval_repetition"] > max_repetition:
        return f"repeated 4-grams {evaluation['eval_repetition']:.3f} > --stop_repetition {max_repetition:g}"
    floor = min_length_ratio * first.get("eval_length", 0.0)
    if min_length_ratio > 0 and evaluation["eval_length"] < floor:
        return (f"mean length {evaluation['eval_length']:.1f} tokens < --stop_length_ratio {min_length_ratio:g} x "
                f"{first['eval_length']:.1f} before training")
    return ""


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
                clip: float, clip_high: float | None = None, weights: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over real tokens of the clipped surrogate loss (Schulman et al. 2017, eq. 7, negated):

        ratio = exp(logp - logp_old),  loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps_low, 1 + eps_high))
    with eps_low = clip and eps_high = clip_high (DAPO's clip-higher, Yu et al. 2025; = clip when None);
    `weights` (default: the mask) weigh each token's loss (loss_weights). Also returns sums over real
    tokens of: clipped (the clip was active) and approx_kl, the k3 estimator (ratio - 1) - log ratio of
    KL(old || new) (Schulman 2020, "Approximating KL divergence")."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    loss = masked_sum(torch.maximum(unclipped, clipped), mask if weights is None else weights)
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


# ----------------------------------------------------------------------------------------------------
# The group-relative family (GRPO, Dr. GRPO, RLOO, REINFORCE++). Rows come in groups of G consecutive
# samples of one prompt; every token of a reply gets its sequence's advantage.

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-4) -> torch.Tensor:
    """(N,) sequence advantages of N = groups x G rewards laid out group by group:

        grpo          (r - mean_g) / (std_g + eps)       Shao et al. 2024 (DeepSeekMath), eq. 3; std unbiased
        dr_grpo       r - mean_g                         Liu et al. 2025 (Dr. GRPO): no std division
        rloo          r - mean of the other G - 1        Ahmadian et al. 2024 = G / (G - 1) * (r - mean_g)
        reinforce_pp  r - mean_g                         Hu 2025 (REINFORCE++ with baseline); the caller then
                                                         rescales over the whole global batch (masked_rescale)
    A group whose rewards are all equal gets advantage exactly 0 under every estimator."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    groups = rewards.double().view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if estimator == "grpo":
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    elif estimator == "rloo":
        centred = centred * group_size / (group_size - 1)
    return centred.view(-1).to(rewards.dtype)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) bool: the groups whose G rewards are all equal (they carry no policy gradient)."""
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(-1)


def loss_weights(mask: torch.Tensor, aggregation: str, max_len: int) -> tuple[torch.Tensor, float]:
    """(B, R) weights of each token's loss and the units of the batch, so that sum(loss * weights) / units,
    with units summed over every micro-batch of a global mini-batch (on all ranks), is:

        token_mean               mean over all reply tokens of the mini-batch (DAPO, Yu et al. 2025)
        seq_mean_token_mean      mean over replies of each reply's token mean (the GRPO paper, eq. 3)
        seq_mean_token_sum_norm  mean over replies of each reply's token sum / max_len (Dr. GRPO's
                                 constant normaliser, no length bias)
    Rows without tokens (left out of the loss) count in no mean."""
    replies = float((mask.sum(-1) > 0).sum().item())
    if aggregation == "token_mean":
        return mask, float(mask.sum().item())
    if aggregation == "seq_mean_token_mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1), replies
    if aggregation == "seq_mean_token_sum_norm":
        return mask / max_len, replies
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = logp_ref - logp, >= 0 and
    unbiased under samples of pi (Schulman 2020; the GRPO paper's eq. 4)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0
