"""The forward seam: every stage scores sequences through these functions and nothing else.

``logprobs`` (policy and reference), ``token_values`` (the critic) and ``rewards`` (a scalar
head at each sequence's end) run the model's plain padded forward, or an exactly equal faster
path from ``rlhfkit.fast`` (packed rows, no padding computed) where a probe of that model shows
the two agree. They run in the precision the stage was set to (``set_precision``): bf16 autocast
or fp32. Logprobs and entropy always come from fp32 logits (``fp32_logits``: the LM head runs in
fp32 over the final hidden state) and an fp32 log-softmax (``losses``).
"""

from __future__ import annotations

import contextlib
import functools
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
    with precision_context(), fp32_logits(model):
        packed = fast and packing.packs_exactly(model, "logprobs", _plain_logprobs)
        return _logprobs(model, seqs, temperature, with_entropy, packed)


def output_head(model) -> torch.nn.Linear | None:
    """The LM head of the causal LM inside ``model`` (under DDP, DeepSpeed or PEFT), when it is a
    plain linear layer."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            head = module.get_output_embeddings()
            return head if type(head) is torch.nn.Linear else None
    return None


def _fp32_linear(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


@contextlib.contextmanager
def fp32_logits(model):
    """In the block, ``model``'s LM head computes fp32 logits from the final hidden state, also
    under bf16 autocast. bf16 logits round each token's logprob by ~0.03 on SmolLM2-135M (0.14 at
    most), where one PPO update moves it by ~5e-4: the ratio, its clipping, the KL penalty and
    DPO's summed logprobs would be mostly rounding (issue 27). Costs one fp32 matmul of the head."""
    head = output_head(model)
    if head is None or not torch.is_autocast_enabled(input_device(model).type):
        yield
        return
    own = head.__dict__.get("forward")  # a speed path's or a hook's wrapper, if any
    head.forward = functools.partial(_fp32_linear, head)
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


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
