"""Pure functions for RL on language models: masked statistics, KL estimators, KL-penalised
rewards, and GAE (InstructGPT §3.5 / App. C; "The N+ implementation details of RLHF with PPO").

Shapes: (B, T) tensors over response tokens; ``mask`` is 1/True on real response tokens (up to
and including the EOS) and 0 on padding and on anything after the first EOS. Every statistic
and every loss multiplies by ``mask``, so tokens after EOS never count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def same(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total: Callable = same) -> torch.Tensor:
    """Mean over masked entries (all of them, or along ``dim``); 0 where nothing is masked in.
    ``total`` sums a statistic over every process's share of the batch (one process: itself)."""
    if dim is not None:
        return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)
    return total(masked_sum(x, mask)) / total(mask.sum()).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, total: Callable = same) -> torch.Tensor:
    """Variance over masked entries, with Bessel's correction by default (as TRL/N+ do)."""
    mean = masked_mean(x, mask, total=total)
    centered_sq = masked_mean((x - mean) ** 2, mask, total=total)
    n = total(mask.sum())
    if unbiased and n > 1:
        centered_sq = centered_sq * n / (n - 1)
    return centered_sq


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Callable = same) -> torch.Tensor:
    """(x - mean) / std over masked entries only (padding does not bias the statistics), over
    the whole batch when ``total`` sums across processes.

    ``shift_mean=False`` keeps the mean (N+ detail: rewards are scaled, not shifted, when
    whitening rewards). Masked-out entries come back as 0.
    """
    mean, var = masked_mean(x, mask, total=total), masked_var(x, mask, total=total)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens, (B, T) -> (B, T).

    k1 = log p - log q: unbiased, can be negative per token.
    k3 = (q/p - 1) - log(q/p): unbiased, always >= 0, lower variance (Schulman, "Approximating KL
    divergence", 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (expected 'k1' or 'k3')")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, (B, T) -> (B,). Rows are contiguous from column 0."""
    return (mask.sum(-1) - 1).clamp(min=0).long()


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
    kl_coef: float, estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL_t at every response token, plus the sequence score at the
    last real token (InstructGPT eq. 2: r(x, y) - beta * log(pi / pi_SFT)).

    Args: scores (B,) reward-model scores (already including any missing-EOS penalty);
    logprobs, ref_logprobs, mask (B, T).
    Returns: rewards (B, T) (0 on masked positions) and the per-token KL (B, T) (masked).
    """
    kl = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over the batch, (B, T) -> advantages, returns.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V_{t+1} = 0 after the last real token (the episode
    ends at EOS); A_t = sum_l (gamma * lam)^l delta_{t+l}; returns_t = A_t + V_t. Computed as one
    backwards scan over time (T steps of (B,) work). Masked positions get 0.
    """
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = deltas[:, t] + gamma * lam * running * mask[:, t]
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                  lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE straight from the definition, one sequence and one token at a time (for tests):
    A_t = sum_{l=0}^{n-1-t} (gamma*lam)^l delta_{t+l} over the n real tokens of each row."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        v = [float(values[b, t]) for t in range(n)] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
    returns = (advantages + values) * mask
    return advantages, returns


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adaptive towards a target KL (Ziegler et al. 2019, eq. 2).

    adaptive: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_samples / horizon).
    Its state (``value``) is saved in checkpoints so a resumed run continues the same schedule.
    """

    value: float
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10_000

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_samples / self.horizon


# --- group baselines (GRPO, RLOO): no value model, the other samples of a prompt are the baseline --


def group_advantages(rewards: torch.Tensor, baseline: Literal["grpo", "rloo"], eps: float = 1e-4) -> torch.Tensor:
    """Advantage of each of G samples per prompt, (P, G) -> (P, G).

    grpo: (r - mean of the group) / (std of the group + eps)  (DeepSeekMath, Shao et al. 2024, §4.1;
        std with Bessel's correction, as TRL computes it).
    rloo: r - mean of the *other* G-1 samples = G/(G-1) (r - group mean)  (Ahmadian et al. 2024,
        REINFORCE leave-one-out: an unbiased baseline, since it does not use the sample itself).
    A group whose rewards are all equal gets advantage 0 under both: it teaches nothing.
    """
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError(f"group baselines need at least 2 samples per prompt, got {g}")
    centered = rewards - rewards.mean(-1, keepdim=True)
    if baseline == "grpo":
        return centered / (rewards.std(-1, keepdim=True) + eps)
    if baseline == "rloo":
        return centered * g / (g - 1)
    raise ValueError(f"unknown baseline {baseline!r} (expected 'grpo' or 'rloo')")


def equal_reward_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(P, G) -> (P,) bool: groups whose samples all got the same reward (zero advantage)."""
    return (rewards == rewards[:, :1]).all(-1)
