"""The built-in engine: batched decoding with the model itself, a KV cache and continuous batching.

Our own loop rather than ``model.generate``: nothing from a model's ``generation_config``
(repetition penalties, top-k defaults) can silently change the distribution PPO's logprobs
assume. Prompts go through the model's ``forward``; decoding steps of Llama-family models
through ``DecodeStep`` (the same numbers with less overhead, fast/decode_step.py).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rlhfkit.data.tokenize import common_prefix_length, left_pad_after_common_prefix
from rlhfkit.engines import Output, SamplingParams
from rlhfkit.fast.decode_step import DecodeStep
from rlhfkit.logprobs import accepts_logits_to_keep
from rlhfkit.models import attention_implementation, input_device, unwrap
from rlhfkit.precision import autocast

# Waiting prompts join a running batch once this share of its slots is free: a prefill forward
# costs about a decoding step, so joining one row at a time would add a step per row.
REFILL_FRACTION = 0.25


class BuiltinEngine:
    """Generates with ``model`` in ``precision`` (autocast), ``batch_size`` rows at a time.
    ``frozen``: the weights will not change (serving, chat), so they are cast for decoding once
    here instead of on every call."""

    def __init__(self, model: torch.nn.Module, pad_id: int, precision: str = "fp32", batch_size: int = 16,
                 frozen: bool = False, fast_steps: bool = True):
        self.pad_id, self.precision, self.batch_size = pad_id, precision, batch_size
        self.frozen, self.fast_steps = frozen, fast_steps
        self.load_weights(model)

    def load_weights(self, model: torch.nn.Module) -> None:
        # The built-in engine reads the model's own parameters; only cast copies need renewing.
        self.model = model
        self._step = self._build_step(rows=1) if self.frozen else None

    def _build_step(self, rows: int) -> DecodeStep | None:
        if not self.fast_steps:
            return None
        with autocast(self.precision):  # the weights are cast for the precision decoding runs in
            return DecodeStep.build(self.model, rows=rows)

    @contextlib.contextmanager
    def _decoding(self, rows: int):
        """Eval mode, autocast, SDPA attention (faster for decoding on CPU) and the decoding step."""
        was_training = self.model.training
        self.model.eval()
        step = self._step if self.frozen else self._build_step(rows)
        try:
            with torch.no_grad(), autocast(self.precision), attention_implementation(self.model, "sdpa"), \
                    step.model_uses_cast_weights() if step is not None else contextlib.nullcontext():
                yield step
        finally:
            self.model.train(was_training)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, on_finished=None,
                 seeds: list[int] | None = None) -> list[Output]:
        out = [Output([], False, [] if params.logprobs else None) for _ in prompts]
        if params.max_new_tokens <= 0:
            return out
        generators = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
        with self._decoding(self.batch_size) as step:
            for i, token, logprob, done in _steps(self.model, step, prompts, params, self.pad_id, self.batch_size,
                                                  generators):
                _add(out[i], token, logprob, params, done)
                if done and on_finished is not None:
                    on_finished(1)
        return out

    def stream(self, prompt: list[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Consume it in one thread (autocast is per thread); the model decodes until it ends or is closed."""
        if params.max_new_tokens <= 0:
            return
        with self._decoding(1) as step:
            for _, token, _, _ in _steps(self.model, step, [prompt], params, self.pad_id, 1,
                                         None if generator is None else [generator]):
                yield token


def _add(out: Output, token: int, logprob: float | None, params: SamplingParams, done: bool) -> None:
    out.token_ids.append(token)
    if out.logprobs is not None:
        out.logprobs.append(logprob)
    if done:
        out.finished = token in params.stop


@dataclass
class _Rows:
    """The rows decoding together: their KV cache, the attention mask over the cache's columns,
    each row's next token (sampled, not yet fed) and its position, and which prompt it answers."""

    cache: object
    mask: torch.Tensor  # (B, L): 1 where a cache column holds a real token of that row
    token: torch.Tensor  # (B,)
    position: torch.Tensor  # (B,): the position ``token`` takes when fed
    prompt: torch.Tensor  # (B,): index into the prompts


def _steps(model, step: DecodeStep | None, prompts: list[list[int]], params: SamplingParams, pad_id: int,
           batch_size: int, generators: list[torch.Generator] | None,
           ) -> Iterator[tuple[int, int, float | None, bool]]:
    """The decoding loop; yields (prompt index, token, its logprob or None, whether that prompt's
    answer is done) for every token, until every prompt's answer is done.

    One forward per token with a KV cache; only the last position goes through the LM head.
    Position ids count real tokens, as in training, so padding changes nothing. The model builds
    its own cache (hybrid and sliding-window models need their kind).

    Continuous batching: finished rows leave the batch and its cache, and once a quarter of the
    ``batch_size`` slots are free, waiting prompts are prefilled and join it (their cache
    left-padded to the batch's length): a step costs nearly as much for one row as for sixteen on
    CPU, so without refilling a batch's slowest answer kept the loop running nearly empty. Caches
    that cannot drop rows keep them (their tokens ignored) and take no new ones until the batch
    is done. The prompts' common prefix (a chat template's system prompt) is computed once and its
    KV cache copied into every new row. ``generators``: one per prompt, so an answer's sample does
    not depend on which other prompts decode beside it (None: the global RNG)."""
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    cache_arg = cache_argument(model)
    device = input_device(model)  # an offloaded reference's weights sit on meta between forwards
    stop_ids = torch.tensor(params.stop, device=device, dtype=torch.long)
    lengths = [0] * len(prompts)
    prefix = _prefix_cache(model, prompts, device, extra)
    waiting = list(range(len(prompts)))
    rows: _Rows | None = None
    refill_at = max(1, int(batch_size * REFILL_FRACTION))

    spare = torch.Generator()  # rows kept after finishing (prompt -1) draw here; their tokens are ignored

    def pick(logits: torch.Tensor, which: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits.float()
        rngs = None if generators is None else [generators[i] if i >= 0 else spare for i in which]
        tokens = (sample_tokens(logits, params.temperature, params.top_p, rngs) if params.temperature > 0
                  else logits.argmax(-1))
        if not params.logprobs:
            return tokens, None
        scaled = logits / params.temperature if params.temperature > 0 else logits
        return tokens, torch.log_softmax(scaled, -1).gather(1, tokens[:, None]).squeeze(1)

    def record(batch: _Rows, logprobs: torch.Tensor | None):
        """Each live row's new token; True where a row has just finished."""
        done = torch.isin(batch.token, stop_ids) & (batch.prompt >= 0)
        lps = [None] * len(done) if logprobs is None else logprobs.tolist()
        events = []
        for j, (i, token, finished) in enumerate(zip(batch.prompt.tolist(), batch.token.tolist(), done.tolist())):
            if i >= 0:  # -1: a finished row kept by a cache that cannot drop rows
                lengths[i] += 1
                done[j] = finished or lengths[i] >= params.max_new_tokens
                events.append((i, token, lps[j], bool(done[j])))
        return done, events

    while waiting or rows is not None:
        free = batch_size - (0 if rows is None else len(rows.prompt))
        if waiting and (rows is None or (free >= min(refill_at, len(waiting)) and _can_merge(rows.cache))):
            take, waiting = waiting[:free], waiting[free:]
            new, logprobs = _prefill(model, [prompts[i] for i in take], take, prefix, pad_id, pick, device, extra,
                                     cache_arg)
            done, events = record(new, logprobs)
            rows = new if rows is None else _merge(rows, new)
            done = torch.cat([torch.zeros(len(rows.prompt) - len(done), dtype=torch.bool, device=device), done])
        else:
            rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.mask), 1)], 1)  # the fed token's column
            if step is not None and _can_merge(rows.cache):
                logits = step(rows.token, rows.position, rows.mask, rows.cache)
            else:
                out = model(input_ids=rows.token[:, None], attention_mask=rows.mask,
                            position_ids=rows.position[:, None], use_cache=True, **{cache_arg: rows.cache}, **extra)
                rows.cache, logits = returned_cache(out), out.logits[:, -1]
            rows.position = rows.position + 1
            rows.token, logprobs = pick(logits, rows.prompt.tolist())
            done, events = record(rows, logprobs)
        yield from events
        if bool(done.any()):
            rows = _drop(rows, done)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                  generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / T), (B, V) -> (B,), by inverting the CDF with one
    uniform number per row (``torch.multinomial`` draws an exponential for every vocabulary entry,
    far slower over a large vocabulary: bench/README.md). ``right=True`` picks the first token
    whose cumulative mass exceeds u, so zero-probability tokens never come. ``top_p`` < 1: only
    the smallest set of most likely tokens whose probability reaches it (nucleus sampling).
    ``generator``: one for the batch, or a list with one per row."""
    probs = torch.softmax(logits / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * (probs.cumsum(-1) - probs < top_p)  # the mass before a kept token is short of top_p
    cdf = probs.cumsum(-1)
    if isinstance(generator, list):
        u = torch.cat([torch.rand(1, 1, generator=g, device=g.device).to(cdf.device) for g in generator])
    else:
        u = torch.rand(len(cdf), 1, device=cdf.device, generator=generator)
    u = u * cdf[:, -1:]  # fp32 sums miss 1 by ~1e-6
    tokens = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    return (tokens if order is None else order.gather(1, tokens)).squeeze(1)


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


def _prefill(model, prompts: list[list[int]], which: list[int], prefix, pad_id: int, pick, device, extra: dict,
             cache_arg: str) -> tuple[_Rows, torch.Tensor | None]:
    """Run the prompts (all sharing ``prefix``'s tokens when it is given) into a fresh cache and
    pick each one's first new token."""
    cache, shared = None, 0
    if prefix is not None:
        cache, shared = copy.deepcopy(prefix[0]), prefix[1]
        cache.batch_repeat_interleave(len(prompts))
    ids, mask, _ = left_pad_after_common_prefix(prompts, pad_id, shared)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions[:, shared:],
                use_cache=True, **{cache_arg: cache}, **extra)
    token, logprobs = pick(out.logits[:, -1], which)
    return _Rows(returned_cache(out), mask, token, positions[:, -1] + 1, torch.tensor(which, device=device)), logprobs


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
