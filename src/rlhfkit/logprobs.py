"""The forward seam: every stage scores sequences through these functions and nothing else.

``logprobs`` (policy and reference), ``token_values`` (the critic) and ``rewards`` (a scalar
head at each sequence's end) run the model's plain padded forward, or an exactly equal faster
path from ``rlhfkit.fast`` (packed rows, no padding computed) where a probe of that model shows
the two agree. They run in the precision the stage was set to (``set_precision``): bf16 autocast
or fp32; logprobs and entropy are always computed from fp32 log-softmax (``losses``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from rlhfkit.data.tokenize import Example, right_pad
from rlhfkit.fast import packing
from rlhfkit.losses import entropy_from_logits, token_logprobs
from rlhfkit.models import input_device, is_encoder, is_wrapped, unwrap
from rlhfkit.precision import autocast
from rlhfkit.records import Sequences, join

class _Precision(threading.local):
    value = "fp32"  # per thread, like autocast itself: a reward model scored in one thread leaves others alone


_precision = _Precision()


def set_precision(precision: str) -> None:
    """The precision every forward of this thread runs in from now on (each stage sets its own)."""
    autocast(precision)  # refuses an unresolved `auto`
    _precision.value = precision


@contextlib.contextmanager
def running_in(precision: str):
    """``set_precision`` for a block (a reward model or an evaluation with a precision of its own)."""
    before = _precision.value
    set_precision(precision)
    try:
        yield
    finally:
        set_precision(before)


def precision_context() -> contextlib.AbstractContextManager:
    return autocast(_precision.value)


def logprobs(model, seqs: Sequences, temperature: float = 1.0, with_entropy: bool = False, fast: bool = True):
    """log pi(response token) under ``model``, (B, R), 0 on padding, with logits divided by the
    sampling temperature (N+ detail 8: the sampled distribution is softmax(logits / T)); with
    ``with_entropy`` also each position's entropy, (B, R). ``fast=False``: the plain path only."""
    with precision_context():
        packed = fast and packing.packs_exactly(model, "logprobs", _plain_logprobs)
        return _logprobs(model, seqs, temperature, with_entropy, packed)


def _logprobs(model, seqs: Sequences, temperature: float, with_entropy: bool, packed: bool):
    if packed:
        logits, targets, back = packing.packed_logits(model, seqs)  # (1, M, V), (1, M)
    else:
        logits = response_logits(model, seqs)  # (B, R, V)
        targets = seqs.input_ids[:, seqs.prompt_width :].masked_fill(seqs.response_mask == 0, -100)
        back = lambda x: x
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    out = back(token_logprobs(logits, targets.to(logits.device)))
    return (out, back(entropy_from_logits(logits))) if with_entropy else out


def _plain_logprobs(model, seqs: Sequences) -> torch.Tensor:
    return _logprobs(model, seqs, 1.0, False, packed=False)


def response_logits(model, seqs: Sequences) -> torch.Tensor:
    """Logits that predict each response token from a padded forward, (B, R, V): position P-1+t
    predicts token P+t. Only those R positions go through the LM head (``logits_to_keep``):
    prompts are most of each sequence in RLHF, and logits over a large vocabulary at every
    prompt position would be computed only to be dropped."""
    width = seqs.input_ids.shape[1] - seqs.prompt_width
    kwargs = {"logits_to_keep": width + 1} if accepts_logits_to_keep(model) else {}  # positions P-1 .. end
    device = input_device(model)
    out = model(input_ids=seqs.input_ids.to(device), attention_mask=seqs.attention_mask.to(device),
                position_ids=seqs.position_ids.to(device), **kwargs)
    return out.logits[:, -width - 1 : -1]


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under ``model`` (maybe wrapped by PEFT) takes ``logits_to_keep``
    (transformers' models do; a hand-written one may not)."""
    return "logits_to_keep" in inspect.signature(type(unwrap(model)).forward).parameters


def token_values(model, seqs: Sequences, fast: bool = True) -> torch.Tensor:
    """V(prompt + response[:t]) for every response position t, (B, R), 0 on padding: the value
    head on the hidden state that predicts response token t (aligned with ``logprobs``)."""
    with precision_context():
        if fast and packing.packs_exactly(model, "values", _plain_token_values):
            return packing.packed_token_values(model, seqs)
        return _plain_token_values(model, seqs)


def _plain_token_values(model, seqs: Sequences) -> torch.Tensor:
    inner = unwrap(model)  # LoRA: adapters stay active
    backbone = getattr(inner, inner.base_model_prefix)
    device = input_device(model)
    hidden = backbone(input_ids=seqs.input_ids.to(device), attention_mask=seqs.attention_mask.to(device),
                      position_ids=seqs.position_ids.to(device)).last_hidden_state
    values = inner.score(hidden[:, seqs.prompt_width - 1 : -1]).squeeze(-1).float()
    return values * seqs.response_mask.to(values.device)


def rewards(model, sequences: list[list[int]], pad_id: int, fast: bool = True) -> torch.Tensor:
    """Raw scalar rewards (N,) of token sequences, read at each one's last token."""
    with precision_context():
        if (fast and not is_wrapped(model) and not _is_encoder(model)
                and packing.packs_exactly(model, "rewards", _plain_rewards)):
            return packing.packed_rewards(model, sequences)
        return _plain_rewards(model, sequences, pad_id)


def _plain_rewards(model, sequences: list[list[int]], pad_id: int | None = None) -> torch.Tensor:
    if pad_id is None:  # the probe: the model's own pad id, where its head looks for each row's end
        pad_id = unwrap(model).config.pad_token_id
    ids, mask = right_pad(sequences, pad_id)
    device = input_device(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()


def _is_encoder(model) -> bool:
    return is_encoder(unwrap(model).config)


def demonstration_nll(model, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the examples' response tokens, and how many there are
    (the SFT loss before dividing by the global batch's token count)."""
    seqs = join([ex.prompt for ex in examples], [ex.response for ex in examples], pad_id)
    return -logprobs(model, seqs).sum(), int(seqs.response_mask.sum())
