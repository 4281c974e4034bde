"""Loss functions as pure functions of tensors (no models, no configs).

Conventions: ``logits`` (B, T, V); ``labels`` (B, T) with IGNORE (-100) where no loss applies;
masks are 1/True where a token counts. Each loss returns per-example or summed values plus
detached diagnostics, and leaves the reduction over a (possibly accumulated, possibly
distributed) batch to the caller, which knows the true token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with logits: position t is scored on token t+1; the last column has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits: (B, T, V), (B, T) -> (B, T).

    Computed in fp32 (log_softmax over a bf16 vocabulary loses ~2 digits). IGNORE targets give 0.
    """
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets == IGNORE, 0.0)


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over labelled tokens, and their count.

    Args: logits (B, T, V); labels (B, T), unshifted, IGNORE at prompt and padding positions.
    Returning the *sum* lets the caller divide by the number of loss tokens in the whole global
    batch, so that gradient accumulation and data parallelism give the same gradient as one big
    batch (a per-micro-batch mean would weight short micro-batches more).
    """
    targets = shift_labels(labels)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return nll, int((targets != IGNORE).sum())


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
