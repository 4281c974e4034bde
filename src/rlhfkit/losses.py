"""Loss functions as pure functions of tensors (no models, no configs).

Conventions: ``logits`` (B, T, V); ``labels`` (B, T) with IGNORE (-100) where no loss applies;
masks are 1/True where a token counts. Each loss returns per-example or summed values plus
detached diagnostics, and leaves the reduction over a (possibly accumulated, possibly
distributed) batch to the caller, which knows the true token count.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: (B, T, V), (B, T) -> (B, T).

    Computed in fp32 (log_softmax over a bf16 vocabulary loses ~2 digits). IGNORE targets give 0.
    """
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets == IGNORE, 0.0)


# --- reward model -----------------------------------------------------------------------------


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss per pair: -log sigmoid(r_chosen - r_rejected - margin).  (B,) -> (B,)

    ``margin`` (B,) is the optional preference strength of Llama 2's RM (0 when absent).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def ranking_loss(
    rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-wise ranking loss per prompt (InstructGPT eq. 1).

    Args:
        rewards: (B, K) reward of each completion.
        ranks: (B, K) rank of each completion, 0 = best; equal ranks are ties.
        valid: (B, K) bool, False for padding completions (prompts with fewer than K).
        margin: optional (B,) subtracted from every pair's difference (see ``pairwise_loss``).
    Returns:
        loss (B,): mean over the prompt's untied pairs (better, worse) of
            -log sigmoid(r_better - r_worse). Without ties that is InstructGPT's 1/C(K,2)
            weighting, so each prompt weighs the same however many pairs it has; tied pairs are
            skipped and the mean is over the pairs that remain. A prompt with no untied pair
            gives 0.
        n_pairs (B,): untied pairs per prompt.
    All C(K,2) pairs come from one forward pass over the K completions (one batch element), so
    the shared prompt is not over-fitted as it would be with pairs as separate examples.
    """
    better = ranks.unsqueeze(2) < ranks.unsqueeze(1)  # (B, K, K): completion i ranked above j
    pair_ok = better & valid.unsqueeze(2) & valid.unsqueeze(1)
    diffs = rewards.unsqueeze(2) - rewards.unsqueeze(1)  # (B, K, K): r_i - r_j
    if margin is not None:
        diffs = diffs - margin[:, None, None]
    pair_loss = -F.logsigmoid(diffs) * pair_ok
    n_pairs = pair_ok.sum(dim=(1, 2))
    return pair_loss.sum(dim=(1, 2)) / n_pairs.clamp(min=1), n_pairs


def center_penalty(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared reward per prompt, (B, K) -> (B,): keeps rewards near 0 (Eisenstein et al. 2023),
    so the RM's offset does not drift; mixed in with a small coefficient."""
    return (rewards.pow(2) * valid).sum(-1) / valid.sum(-1).clamp(min=1)


# --- PPO (Schulman et al. 2017, as used by InstructGPT and the N+ paper) --------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate per token, (B, T) -> (B, T) loss (0 on masked tokens) and diagnostics.

    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip)), ratio = exp(logp - old).
    Diagnostics (masked means, detached): clipfrac (share of tokens where the clipped term is
    the larger), approx_kl (k3 estimate of KL(old || new), N+ detail), ratio mean.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped) * mask
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clipfrac": ((clipped > unclipped).float() * mask).sum() / n,
            "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * mask).sum() / n,
            "ratio": (ratio * mask).sum() / n,
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss per token: 0.5 * max((V - R)^2, (V_clipped - R)^2), (B, T) -> (B, T).

    V_clipped = old_V + clip(V - old_V, -clip, clip) keeps the value function near the one that
    computed the advantages (N+ detail: value clipping, as in OpenAI's lm-human-preferences).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped_sq, clipped_sq) * mask
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"value_clipfrac": ((clipped_sq > unclipped_sq).float() * mask).sum() / n}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the sampling distribution, (B, T, V) -> (B, T), in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --- DPO family (direct preference optimisation, no reward model) ---------------------------------


class DPOLoss(str, Enum):
    """DPO loss variants. Each knows what it needs, so the trainer asks instead of branching on names."""

    SIGMOID = "sigmoid"
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))."""
    IPO = "ipo"
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2 on per-token average log-ratios, as the IPO
    authors and TRL compute it; a squared loss that does not push the margin to infinity."""
    CONSERVATIVE = "cdpo"
    """Conservative DPO (Mitchell 2023): the sigmoid loss with labels flipped with probability
    ``label_smoothing``, for noisy preferences."""
    SIMPO = "simpo"
    """SimPO (Meng et al. 2024): reference-free; the implicit reward is beta times the per-token
    average logprob, with a target margin ``simpo_gamma``."""

    @property
    def needs_reference(self) -> bool:
        return self is not DPOLoss.SIMPO

    @property
    def length_normalised(self) -> bool:
        return self in (DPOLoss.IPO, DPOLoss.SIMPO)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    variant: DPOLoss = DPOLoss.SIGMOID,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO-family loss, (B,) -> (B,), and detached per-pair diagnostics.

    Args:
        chosen_logps, rejected_logps: (B,) summed response logprobs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference (None for
            reference-free variants).
        chosen_lengths, rejected_lengths: (B,) response tokens, for length-normalised variants.
    Returns:
        loss (B,); stats with rewards_chosen / rewards_rejected (B,): the implicit rewards
        beta * log(pi / pi_ref) (beta * mean logprob for SimPO), whose difference is the margin.
    At the start of training, policy = reference, so every log-ratio is 0 and the sigmoid loss is
    ln 2 whatever beta is (a test anchors this).
    """
    if variant.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"DPO loss '{variant.value}' needs reference logprobs")
        chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    else:
        chosen, rejected = chosen_logps, rejected_logps
    if variant.length_normalised:
        chosen, rejected = chosen / chosen_lengths.clamp(min=1), rejected / rejected_lengths.clamp(min=1)
    margin = chosen - rejected
    if variant is DPOLoss.SIGMOID:
        loss = -F.logsigmoid(beta * margin)
    elif variant is DPOLoss.CONSERVATIVE:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif variant is DPOLoss.IPO:
        loss = (margin - 1 / (2 * beta)) ** 2
    else:  # SIMPO
        loss = -F.logsigmoid(beta * margin - simpo_gamma)
    stats = {"rewards_chosen": (beta * chosen).detach(), "rewards_rejected": (beta * rejected).detach()}
    return loss, stats


# --- GRPO / RLOO (policy gradient with a group baseline) ------------------------------------------


def policy_gradient_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token on-policy loss with a sequence-level advantage, (B, T) -> (B, T), 0 on masked tokens.

    loss_t = -A * exp(logp_t - sg(logp_t)) + kl_coef * k3_t. The ratio to the sampling policy is
    exactly 1 (one update per batch of samples, so PPO's clip never acts), while its gradient is
    A * grad logp_t: REINFORCE with the group baseline, as TRL's GRPO writes it. The optional KL
    term is the k3 estimator against the reference, added to the loss rather than the reward
    (GRPO's choice). ``advantages`` (B,) is broadcast over each response's tokens. ``weights``
    (B, T), optional: per-token weights of the policy-gradient term (truncated importance
    sampling), not of the KL term.
    """
    ratio = torch.exp(logprobs - logprobs.detach())
    loss = -advantages.unsqueeze(-1) * ratio
    if weights is not None:
        loss = loss * weights
    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None and kl_coef:
        log_ratio = ref_logprobs - logprobs
        kl = torch.expm1(log_ratio) - log_ratio  # k3 of KL(policy || reference), >= 0
        loss = loss + kl_coef * kl
        with torch.no_grad():
            stats["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
    return loss * mask, stats


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """min(pi_trainer / pi_sampler, cap) per sampled token, (B, T), detached, 0 on masked tokens.

    The rollout engine's probabilities differ slightly from the trainer's (other kernels, other
    precision), so samples are off-policy by that much; truncated importance sampling reweights
    each token's policy-gradient term by this ratio, capped so no token dominates (Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
    ``vllm_importance_sampling_correction``)."""
    with torch.no_grad():
        return torch.exp(trainer_logprobs - sampler_logprobs).clamp(max=cap) * mask


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, level: str, n_tokens: int, n_sequences: int) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to this micro-batch's share of the whole batch's loss.

    token: sum over every token / tokens in the whole batch (each token weighs the same; DAPO,
        Dr. GRPO: long answers are not down-weighted).
    sequence: per-response token mean, summed / responses in the whole batch (GRPO's original
        1/|o_i| weighting, which favours short correct and long wrong answers).
    ``n_tokens`` / ``n_sequences`` count the whole (accumulated) batch, so micro-batching does not
    change the gradient.
    """
    if level == "token":
        return per_token.sum() / max(n_tokens, 1)
    if level == "sequence":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(n_sequences, 1)
    raise ValueError(f"unknown loss aggregation {level!r} (expected 'token' or 'sequence')")
