"""Batched generation from chat prompts: left padding, KV cache, stop at end of turn.

Responses are cut after their first end-of-turn token; ``finished`` says whether it appeared
(the PPO "EOS trick" penalises responses that never end).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.data.records import Messages
from rlhfkit.data.tokenize import Example, end_of_turn_id, left_pad, left_pad_after_common_prefix, prompt_ids, right_pad
from rlhfkit.models import attention_implementation
from rlhfkit.packing import (hidden_states, pack, packs_exactly, probe_sequences, relative_gap, shares_prefixes, spans,
                             unwrap)


@dataclass
class Generation:
    text: str  # decoded response without special tokens
    token_ids: list[int]  # response tokens, up to and including the end-of-turn token if any
    finished: bool  # True when the response ended with the end-of-turn token


def autocast(precision: str):
    """bf16 autocast on the model's device when asked; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    precision: str = "fp32",
    generator_seed: int | None = None,
    progress: str = "",
) -> list[Generation]:
    """Generate one response per prompt. ``temperature`` 0 means greedy decoding. ``progress``
    names a progress bar over the batches (none when empty).

    Prompts are sorted by length so each batch pads little, and results are returned in the
    caller's order. Sampling uses a private RNG when ``generator_seed`` is given, so evaluation
    does not disturb the training RNG stream (exact resume depends on that).
    """
    eot = end_of_turn_id(tokenizer)
    stop = sorted({eot, tokenizer.eos_token_id} - {None})
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[Generation | None] = [None] * len(prompts)
    rng_context = torch.random.fork_rng() if generator_seed is not None else contextlib.nullcontext()
    with rng_context:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        starts = range(0, len(order), batch_size)
        if progress:
            from rich.progress import track

            starts = track(starts, description=progress, transient=True)
        for start in starts:
            idx = order[start : start + batch_size]
            input_ids, attention_mask, shared = left_pad_after_common_prefix([encoded[i] for i in idx],
                                                                             tokenizer.pad_token_id)
            with autocast(precision), attention_implementation(model, "sdpa"):  # faster for decoding on CPU
                out = decode(model, input_ids.to(device), attention_mask.to(device), max_new_tokens, stop,
                             tokenizer.pad_token_id, temperature, shared)
            for row, i in zip(out.tolist(), idx):
                results[i] = cut_at_stop(row, stop, tokenizer)
    model.train(was_training)
    return results  # type: ignore[return-value]


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    temperature: float,
    shared: int = 0,
) -> torch.Tensor:
    """The decoding loop: (B, N) new tokens for left-padded prompts, padded after each row's
    first stop token; N <= max_new_tokens (the loop ends when every row has stopped).
    Finished rows leave the batch. The first ``shared`` columns, the same in every row (see
    ``left_pad_after_common_prefix``), are computed once and their KV cache copied to all rows:
    SmolLM2's system prompt is half of each world prompt's tokens.

    One forward per token with a KV cache; only the last position goes through the LM head.
    Sampling is plain softmax(logits / T) (no top-k/top-p: PPO's logprobs assume exactly that
    distribution); T = 0 is greedy. Position ids count real tokens, as in training. The model
    builds its own cache on the first call (hybrid and sliding-window models need their kind).

    Our own loop rather than ``model.generate``: finished rows leave the batch, and nothing from
    a model's ``generation_config`` (repetition penalties, top-k defaults) can silently change
    the distribution PPO's logprobs assume."""

    batch, device = input_ids.shape[0], input_ids.device
    stop_ids = torch.tensor(stop, device=device)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    out_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    alive = torch.arange(batch, device=device)  # rows still generating, in the cache's order
    step_ids, mask = input_ids, attention_mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    live = torch.ones(batch, dtype=torch.bool, device=device)  # rows of the batch not yet stopped
    cache, length = None, 0
    if shared and batch > 1:
        out = model(input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared],
                    position_ids=positions[:1, :shared], use_cache=True, **extra)
        if hasattr(out.past_key_values, "batch_repeat_interleave"):
            cache = out.past_key_values
            cache.batch_repeat_interleave(batch)
            step_ids, positions = input_ids[:, shared:], positions[:, shared:]
    for t in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, **extra)
        logits, cache = out.logits[:, -1].float(), out.past_key_values
        token = sample_tokens(logits, temperature) if temperature > 0 else logits.argmax(-1)
        out_tokens[alive[live], t], length = token[live], t + 1
        live &= ~torch.isin(token, stop_ids)
        if not bool(live.any()):
            break
        if not bool(live.all()) and hasattr(cache, "batch_select_indices"):
            # Drop finished rows from the batch and the cache: responses end at very different
            # lengths, and a step's forward costs more with every row still in it. (A cache
            # that cannot select rows keeps them; their tokens are ignored.)
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, token, mask, positions, live = alive[keep], token[keep], mask[keep], positions[keep], live[keep]
        step_ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
    return out_tokens[:, :length]


def sample_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row from softmax(logits / T), (B, V) -> (B,), by inverting the CDF with one
    uniform number per row. ``torch.multinomial`` draws an exponential for every vocabulary entry:
    over SmolLM2's 49k tokens that took ~35 ms per decoding step on CPU, this ~2 ms. ``right=True``
    picks the first token whose cumulative mass exceeds u, so zero-probability tokens never come."""
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]  # scaled: fp32 sums miss 1 by ~1e-6
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[-1] - 1)


def cut_at_stop(row: list[int], stop: list[int], tokenizer: PreTrainedTokenizerBase) -> Generation:
    """Keep tokens up to and including the first stop token; drop what follows (padding)."""
    for pos, token in enumerate(row):
        if token in stop:
            kept = row[: pos + 1]
            return Generation(tokenizer.decode(kept[:-1], skip_special_tokens=True), kept, True)
    return Generation(tokenizer.decode(row, skip_special_tokens=True), row, False)


# --- teacher-forced scoring of sampled responses (PPO step 3: recompute logprobs) -------------


@dataclass
class Sequences:
    """Prompts left-padded to width P and responses right-padded to width R, joined: (B, P + R).

    ``response_mask`` (B, R) is 1 on response tokens up to and including the first stop token.
    ``position_ids`` count real tokens only, so a left-padded prompt sees the same positions as an
    unpadded one (otherwise padding would change every logprob).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_width: int


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


def response_logits(model, seqs: Sequences) -> torch.Tensor:
    """Logits that predict each response token from a padded forward, (B, R, V): position P-1+t
    predicts token P+t.

    Only those R positions go through the LM head (``logits_to_keep``): prompts are most of each
    sequence in RLHF, and a (B, P + R, V) logits tensor over a 50k vocabulary costs as much as a
    fifth of the model's forward pass, then the same again in backward."""
    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = seqs.input_ids.shape[1] - seqs.prompt_width + 1  # positions P-1 .. end
    out = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids,
                **kwargs)
    logits = out.logits
    return logits[:, -(seqs.input_ids.shape[1] - seqs.prompt_width) - 1 : -1]


def _accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under ``model`` (maybe wrapped by PEFT) takes ``logits_to_keep``
    (transformers' models do; a hand-written one may not)."""
    return "logits_to_keep" in inspect.signature(type(unwrap(model)).forward).parameters


def packed_response_hidden(model, seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backbone's hidden states at the positions that predict each response token, from a
    packed forward (no padding computed): (M, H) over all M response tokens of the batch, with
    each one's row b and response column t. Position P-1+t of a row predicts its token P+t."""
    real = [ids[mask.bool()] for ids, mask in zip(seqs.input_ids, seqs.attention_mask)]
    packed = pack(real, pad_id=0, share_prefixes=shares_prefixes(model))  # no real token attends to padding
    prompt_lengths = seqs.attention_mask[:, : seqs.prompt_width].sum(-1)
    response_lengths = seqs.attention_mask[:, seqs.prompt_width :].sum(-1)
    rows, columns, b, t = spans(packed, prompt_lengths - 1, response_lengths)
    hidden = hidden_states(model, packed)
    return hidden[rows.to(hidden.device), columns.to(hidden.device)], b, t


def scatter_responses(values: torch.Tensor, b: torch.Tensor, t: torch.Tensor, seqs: Sequences) -> torch.Tensor:
    """Per-response-token values (M,) back into the batch layout (B, R), 0 on padding and after
    the first stop token (differentiable)."""
    out = values.new_zeros(seqs.response_mask.shape).index_put((b.to(values.device), t.to(values.device)), values)
    return out * seqs.response_mask.to(out.device)


def response_logprobs(model, seqs: Sequences, temperature: float = 1.0, with_entropy: bool = False):
    """log pi(response token) under ``model``, with logits divided by the sampling temperature
    (N+ detail: the sampled distribution is softmax(logits / T), so the logprobs must be too).
    (B, R), 0 on padding; with ``with_entropy`` also the entropy of each position's distribution.

    Packed forwards where the model gives the same numbers packed as padded (see
    rlhfkit.packing); padded forwards otherwise."""
    packed = packs_exactly(model, _causal_packing_gap)
    return _response_logprobs(model, seqs, temperature, with_entropy, packed)


def _response_logprobs(model, seqs: Sequences, temperature: float, with_entropy: bool, packed: bool):
    from rlhfkit.losses import entropy_from_logits, token_logprobs

    if packed:
        hidden, b, t = packed_response_hidden(model, seqs)
        logits = unwrap(model).get_output_embeddings()(hidden)[None]  # (1, M, V)
        targets = seqs.input_ids[:, seqs.prompt_width :][b, t][None]
        back = lambda x: scatter_responses(x[0], b, t, seqs)  # (1, M) -> (B, R)
    else:
        logits = response_logits(model, seqs)  # (B, R, V)
        targets = seqs.input_ids[:, seqs.prompt_width :].masked_fill(seqs.response_mask == 0, -100)
        back = lambda x: x
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = back(token_logprobs(logits, targets.to(logits.device)))
    return (logprobs, back(entropy_from_logits(logits))) if with_entropy else logprobs


def demonstration_nll(model, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the examples' response tokens, and how many there are
    (the SFT loss before dividing by the global batch's token count): one teacher-forced forward,
    packed where the model allows."""
    seqs = join([ex.prompt for ex in examples], [ex.response for ex in examples], pad_id)
    return -response_logprobs(model, seqs).sum(), int(seqs.response_mask.sum())


def probe_batch(model) -> Sequences:
    """A tiny batch of three (prompt, response) pairs of different lengths, for packing checks."""
    sequences = probe_sequences(model)
    return join([s[:3].tolist() for s in sequences], [s[3:].tolist() for s in sequences], pad_id=0)


def _causal_packing_gap(model) -> float:
    """Largest |packed - padded| response logprob on the probe batch."""
    seqs = probe_batch(model)
    return relative_gap(_response_logprobs(model, seqs, 1.0, False, True),
                        _response_logprobs(model, seqs, 1.0, False, False))
