"""Batched generation from chat prompts: left padding, KV cache, stop at end of turn.

Responses are cut after their first end-of-turn token; ``finished`` says whether it appeared
(the PPO "EOS trick" penalises responses that never end).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.data.records import Messages
from rlhfkit.data.tokenize import (Example, common_prefix_length, end_of_turn_id, left_pad, left_pad_after_common_prefix,
                                   prompt_ids, right_pad)
from rlhfkit.decode_step import DecodeStep
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
    if precision not in ("fp32", "bf16"):  # `auto` is decided at a command's start (rlhfkit.precision)
        raise ValueError(f"precision {precision!r}: resolve `auto` with rlhfkit.precision.resolve first")
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
    """Generate one response per prompt. ``temperature`` 0 means greedy decoding. At most
    ``batch_size`` prompts decode together; as answers finish, waiting prompts take their places
    (see ``decode``). ``progress`` names a progress bar over the prompts (none when empty).

    Prompts are taken shortest first, so rows that decode together pad little, and results are
    returned in the caller's order. Sampling uses a private RNG when ``generator_seed`` is
    given, so evaluation does not disturb the training RNG stream (exact resume depends on that).
    """
    eot = end_of_turn_id(tokenizer)
    stop = sorted({eot, tokenizer.eos_token_id} - {None})
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    was_training = model.training
    model.eval()
    rng_context = torch.random.fork_rng() if generator_seed is not None else contextlib.nullcontext()
    with rng_context, progress_bar(progress, len(prompts)) as advance:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        with autocast(precision), attention_implementation(model, "sdpa"):  # faster for decoding on CPU
            rows = decode(model, [encoded[i] for i in order], max_new_tokens, stop, tokenizer.pad_token_id,
                          temperature, batch_size, on_finished=advance)
    model.train(was_training)
    results: list[Generation | None] = [None] * len(prompts)
    for i, row in zip(order, rows):
        results[i] = cut_at_stop(row, stop, tokenizer)
    return results  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """A transient rich progress bar over ``total`` prompts; yields ``advance(n)``. No bar when
    ``description`` is empty."""
    if not description:
        yield lambda n: None
        return
    from rich.progress import Progress

    from rlhfkit.progress import columns

    with Progress(*columns(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# Waiting prompts join a running batch once this share of its slots is free: a prefill forward
# costs about a decoding step, so joining one row at a time would add a step per row.
REFILL_FRACTION = 0.25


@dataclass
class _Rows:
    """The rows decoding together: their KV cache, the attention mask over the cache's columns,
    each row's next token (sampled, not yet fed) and its position, and which prompt it answers."""

    cache: object
    mask: torch.Tensor  # (B, L): 1 where a cache column holds a real token of that row
    token: torch.Tensor  # (B,)
    position: torch.Tensor  # (B,): the position ``token`` takes when fed
    prompt: torch.Tensor  # (B,): index into the prompts


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    temperature: float,
    batch_size: int = 16,
    on_finished=lambda n: None,
    fast_steps: bool = True,
) -> list[list[int]]:
    """The decoding loop: for each prompt (token ids), its new tokens up to and including the
    first stop token, or ``max_new_tokens`` of them. Plain softmax(logits / T) sampling (no
    top-k/top-p: PPO's logprobs assume exactly that distribution); T = 0 is greedy.

    One forward per token with a KV cache; only the last position goes through the LM head.
    Position ids count real tokens, as in training, so padding changes nothing. The model builds
    its own cache (hybrid and sliding-window models need their kind).

    Continuous batching: finished rows leave the batch and its cache, and once a quarter of the
    ``batch_size`` slots are free, waiting prompts are prefilled and join it (their cache
    left-padded to the batch's length). A step costs nearly as much for one row as for sixteen
    on CPU (reading the weights and per-layer overhead), so without refilling, a batch's
    slowest answer kept the loop running nearly empty. Caches that cannot drop rows keep them
    (their tokens ignored) and take no new ones until the batch is done.

    The prompts' common prefix (a chat template's system prompt) is computed once and its KV
    cache copied into every new row.

    Prompts go through the model's ``forward``; decoding steps of Llama-family models through
    ``DecodeStep``, and their prompts with its cast weights (the same numbers with less overhead;
    ``fast_steps=False``: the model's own forward throughout).

    Our own loop rather than ``model.generate``: nothing from a model's ``generation_config``
    (repetition penalties, top-k defaults) can silently change the distribution PPO's logprobs
    assume."""
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    fast = DecodeStep.build(model, rows=batch_size) if fast_steps else None
    with fast.model_uses_cast_weights() if fast is not None else contextlib.nullcontext():
        return _decode(model, prompts, max_new_tokens, stop, pad_id, temperature, batch_size, on_finished, fast, extra,
                       cache_argument(model))


def _decode(model, prompts, max_new_tokens, stop, pad_id, temperature, batch_size, on_finished, fast, extra, cache_arg):
    """``decode``'s loop; ``fast``: its DecodeStep or None; ``cache_arg``: the forward's name for the KV cache."""
    out: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    stop_ids = torch.tensor(stop, device=device)
    prefix = _prefix_cache(model, prompts, device, extra)
    waiting = list(range(len(prompts)))
    rows: _Rows | None = None
    refill_at = max(1, int(batch_size * REFILL_FRACTION))

    def record(tokens: torch.Tensor, batch: _Rows) -> torch.Tensor:
        """Append each live row's token; True where a row has just finished."""
        done = torch.isin(tokens, stop_ids) & (batch.prompt >= 0)
        for j, (i, token) in enumerate(zip(batch.prompt.tolist(), tokens.tolist())):
            if i >= 0:  # -1: a finished row kept by a cache that cannot drop rows
                out[i].append(token)
                done[j] |= len(out[i]) >= max_new_tokens
        return done

    while waiting or rows is not None:
        free = batch_size - (0 if rows is None else len(rows.prompt))
        if waiting and (rows is None or (free >= min(refill_at, len(waiting)) and _can_merge(rows.cache))):
            take, waiting = waiting[:free], waiting[free:]
            new = _prefill(model, [prompts[i] for i in take], take, prefix, pad_id, temperature, device, extra, cache_arg)
            done = record(new.token, new)
            rows = new if rows is None else _merge(rows, new)
            done = torch.cat([torch.zeros(len(rows.prompt) - len(done), dtype=torch.bool, device=device), done])
        else:
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.mask), 1)], 1)  # the fed token's column
            if fast is not None and _can_merge(rows.cache):
                logits = fast(rows.token, rows.position, rows.mask, rows.cache)
            else:
                step = model(input_ids=rows.token[:, None], attention_mask=rows.mask,
                             position_ids=rows.position[:, None], use_cache=True, **{cache_arg: rows.cache}, **extra)
                rows.cache, logits = returned_cache(step), step.logits[:, -1]
            rows.position = rows.position + 1
            rows.token = _pick(logits.float(), temperature)
            done = record(rows.token, rows)
        if bool(done.any()):
            on_finished(int(done.sum()))
            rows = _drop(rows, done)
    return out


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return sample_tokens(logits, temperature) if temperature > 0 else logits.argmax(-1)


def _prefix_cache(model, prompts: list[list[int]], device, extra: dict):
    """(KV cache of the prompts' common prefix, its length), or None when there is no prefix to
    share or the model's cache cannot be copied to several rows."""
    shared = common_prefix_length(prompts)
    if not shared:
        return None
    ids = torch.tensor([prompts[0][:shared]], device=device)
    cache = returned_cache(model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 position_ids=torch.arange(shared, device=device)[None], use_cache=True, **extra))
    return (cache, shared) if hasattr(cache, "batch_repeat_interleave") else None


def _prefill(model, prompts: list[list[int]], which: list[int], prefix, pad_id: int, temperature: float, device,
             extra: dict, cache_arg: str) -> _Rows:
    """Run the prompts (all sharing ``prefix``'s tokens when it is given) into a fresh cache and
    pick each one's first new token."""
    cache, shared = None, 0
    if prefix is not None:
        cache, shared = copy.deepcopy(prefix[0]), prefix[1]
        cache.batch_repeat_interleave(len(prompts))
    ids, mask, _ = left_pad_after_common_prefix(prompts, pad_id, shared)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions[:, shared:],
                 use_cache=True, **{cache_arg: cache}, **extra)
    token = _pick(step.logits[:, -1].float(), temperature)
    return _Rows(returned_cache(step), mask, token, positions[:, -1] + 1, torch.tensor(which, device=device))


def _can_merge(cache) -> bool:
    """New rows can join only a plain dynamic cache whose rows can also leave."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return (type(cache) is DynamicCache and hasattr(cache, "batch_select_indices")
            and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers))


def _merge(a: _Rows, b: _Rows) -> _Rows:
    """One batch of both: the shorter cache is left-padded with masked columns."""
    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - x.shape[dim]
        if not missing:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_zeros(shape), x], dim)

    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)])
        la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)])
    return _Rows(a.cache, torch.cat([pad(a.mask, 1), pad(b.mask, 1)]), torch.cat([a.token, b.token]),
                 torch.cat([a.position, b.position]), torch.cat([a.prompt, b.prompt]))


def _drop(rows: _Rows, done: torch.Tensor) -> _Rows | None:
    """The rows still decoding (None when none is). Rows leave the cache where it allows; columns
    that are padding for every remaining row are cut from its left."""
    if not hasattr(rows.cache, "batch_select_indices"):
        # This cache cannot drop rows: finished ones stay, their further tokens never recorded.
        rows.prompt = torch.where(done, -1, rows.prompt)
        return rows if bool((rows.prompt >= 0).any()) else None
    if bool(done.all()):
        return None
    keep = (~done).nonzero().squeeze(1)
    rows.cache.batch_select_indices(keep)
    rows = _Rows(rows.cache, rows.mask[keep], rows.token[keep], rows.position[keep], rows.prompt[keep])
    unused = int(rows.mask.any(0).int().argmax())  # leading columns no remaining row attends to
    if unused and _can_merge(rows.cache):
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
        rows.mask = rows.mask[:, unused:]
    return rows


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


def cache_argument(model) -> str:
    """The name the causal LM under ``model`` takes its KV cache by: ``cache`` in transformers'
    models since they renamed it (``past_key_values`` warns, "removed in 5.40.0"), the old name
    in earlier releases and in hand-written models."""
    return "cache" if "cache" in inspect.signature(type(unwrap(model)).forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward with ``use_cache=True`` returned: its output's ``cache`` field, or
    ``past_key_values`` where the output class still has that one (reading ``past_key_values``
    from the newer classes logs a deprecation warning)."""
    return output.cache if "cache" in getattr(output, "__dataclass_fields__", ()) else output.past_key_values


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
