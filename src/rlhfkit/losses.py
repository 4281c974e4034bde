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
