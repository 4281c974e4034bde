"""Typed records passed between the steps of the training stages, with the shape of every field.

B: sequences in the batch, P: prompt width (left-padded), R: response width (right-padded).
Masks are 1 on real tokens; a response mask is 1 up to and including the first stop token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from rlhfkit.data.tokenize import left_pad, right_pad


@dataclass
class Sequences:
    """Prompts left-padded to width P and responses right-padded to width R, joined: (B, P + R).

    ``position_ids`` count real tokens only, so a left-padded prompt sees the same positions as an
    unpadded one (otherwise padding would change every logprob)."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R): 1 up to and including the first stop token
    prompt_width: int  # P

    def __getitem__(self, rows: torch.Tensor) -> Sequences:
        """The sequences at ``rows``, keeping the whole batch's widths P and R (``select`` cuts them)."""
        return Sequences(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                         self.response_mask[rows], self.prompt_width)

    def __len__(self) -> int:
        return len(self.input_ids)


def join(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Sequences:
    p_ids, p_mask = left_pad(prompts, pad_id)
    r_ids, r_mask = right_pad(responses, pad_id)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Sequences(torch.cat([p_ids, r_ids], dim=1), attention_mask, position_ids, r_mask, p_ids.shape[1])


def select(seqs: Sequences, rows: torch.Tensor) -> Sequences:
    """The sequences at ``rows`` (a minibatch), cut to the columns they use: their widest prompt
    and longest response, not the whole batch's, so no forward computes all-padding columns.
    The response part keeps its first ``R'`` columns, so per-token tensors of the batch match
    after ``[rows, :R']`` (R' = ``response_mask.shape[1]``). Position ids are unchanged."""
    attention, response_mask = seqs.attention_mask[rows], seqs.response_mask[rows]
    used = attention[:, : seqs.prompt_width].any(0)
    start = int(used.int().argmax()) if bool(used.any()) else seqs.prompt_width
    width = max(int(response_mask.sum(-1).max()), 1)
    end = seqs.prompt_width + width
    return Sequences(seqs.input_ids[rows, start:end], attention[:, start:end], seqs.position_ids[rows, start:end],
                     response_mask[:, :width], seqs.prompt_width - start)


@dataclass
class Pair:
    """One comparison as token ids (DPO); both responses end with the end-of-turn token."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class Group:
    """One prompt's completions as token ids (the reward model); ranks 0 = best, equal = tie."""

    seqs: list[list[int]]
    ranks: list[int]
    margin: float  # subtracted from every pair's reward difference (0 = plain Bradley-Terry)
    gold: list[float] | None  # the world's gold scores, to check the RM against the true ordering


class Rows:
    """Indexing a record by rows indexes each tensor field whose first dimension is B; other
    fields (lists indexed by Python, scalars) follow by their type."""

    def __getitem__(self, rows: torch.Tensor):
        picked = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Sequences, Rows)):
                picked[f.name] = value[rows]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in rows.tolist()]
            else:
                picked[f.name] = value
        return type(self)(**picked)


@dataclass
class Scored(Rows):
    """Rollouts with what PPO's updates start from; ``scored[rows]`` is a minibatch."""

    seqs: Sequences  # (B, P + R)
    mask: torch.Tensor  # (B, R) float: 1 on response tokens up to and including the first stop token
    logprobs: torch.Tensor  # (B, R) log pi_old(token), temperature-scaled, 0 after the stop token
    values: torch.Tensor  # (B, R) V_old before each token
    advantages: torch.Tensor  # (B, R) whitened GAE advantages
    returns: torch.Tensor  # (B, R) advantages + values, before whitening: the value targets


@dataclass
class PPOStats:
    """One PPO step's update diagnostics, one value per minibatch update (a skipped update adds
    none); logged as their means. The first ``ratio`` comes before any update, so it must be 1."""

    pg_loss: list[float] = field(default_factory=list)  # masked mean of the clipped surrogate
    vf_loss: list[float] = field(default_factory=list)  # masked mean of the clipped value loss
    clipfrac: list[float] = field(default_factory=list)  # share of tokens whose ratio was clipped
    approx_kl: list[float] = field(default_factory=list)  # k3 estimate of KL(old || new) (N+ detail)
    ratio: list[float] = field(default_factory=list)  # mean pi_new / pi_old over response tokens
    vf_clipfrac: list[float] = field(default_factory=list)  # share of tokens whose value was clipped
    ptx_loss: list[float] = field(default_factory=list)  # PPO-ptx's SFT loss (0 when off)

    def means(self) -> dict[str, float]:
        return {name: sum(values) / max(len(values), 1) for name, values in asdict(self).items()}
