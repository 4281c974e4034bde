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
from rlhfkit.data.tokenize import (common_prefix_length, end_of_turn_id, left_pad_after_common_prefix,
                                   prompt_ids)
from rlhfkit.fast.decode_step import DecodeStep, weights_cast_once  # noqa: F401  (serve and chat decode through here)
from rlhfkit.models import attention_implementation
from rlhfkit.models import unwrap
from rlhfkit.precision import autocast


@dataclass
class Generation:
    text: str  # decoded response without special tokens
    token_ids: list[int]  # response tokens, up to and including the end-of-turn token if any
    finished: bool  # True when the response ended with the end-of-turn token


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
