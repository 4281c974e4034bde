"""Packed forwards: several sequences share one row of the batch, so no compute goes to padding.

A padded batch is as wide as its longest prompt plus its longest response. In RLHF most answers
are short and a few ramble to the length limit, so on the default world half of every padded
PPO batch was padding (measured: 501 real tokens in an 8 x 114 batch; a packed forward+backward
took 2.0 s against 5.0 s padded, SmolLM2 on 2 CPU cores).

Two layouts, in rows (one long row would make attention quadratic in the whole batch):

- **Prefix trees** (models with SDPA or eager attention, which take a custom 4-D mask). Sequences
  that begin alike share one copy of their common prefix, and each token attends to its own path
  from the root. RLHF batches are full of shared prefixes: the K answers to one prompt (reward
  model, GRPO), chosen and rejected (DPO), and the chat template's system prompt in every
  sequence (24 of SmolLM2's ~47 prompt tokens on the world). Measured on SmolLM2: a reward-model
  batch of 4 prompts x 4 answers, forward+backward, 3.96 s end to end -> 1.27 s as trees; a PPO
  minibatch of 8 prompts, 3.05 -> 1.90 s. Where rows are cut is a cost model's choice
  (``tree_rows``): a new row repeats the shared prefix, a wide row pays for attention over it.
- **End to end** (other attention kernels): sequences one after another, position ids restarting
  at 0 and no mask; transformers (>= 5) reads the restarts and keeps sequences apart.

Only the positions a loss needs (the ones that predict a response token, or a sequence's last
token for a reward head) go through the output head.

Not every model honours packed position ids or custom masks (hand-written models, old remote
code), and some heads do more than a Linear (logit soft-capping). ``packs_exactly`` therefore checks each model
once, on a tiny input, against the ordinary padded forward, and callers fall back to padding
when the two disagree.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from rlhfkit.losses import token_logprobs
from rlhfkit.models import input_device, is_wrapped, unwrap
from rlhfkit.records import Sequences, join

ROW_TOKENS = 192  # tokens per end-to-end row; 128-256 measured best on CPU (longer rows pay for attention)
# Prefix-tree rows are sized by a cost model: a row of width W costs W * (1 + W / ATTENTION_WIDTH),
# the linear layers plus attention, which grows with the row. Fitted on SmolLM2 forward+backward
# with eager attention on 2 CPU cores (time per position 3.2 ms at W ~190, 4.0 at ~370, 4.4 at
# ~470); GPU attention kernels are cheaper, so there the model errs towards narrow rows.
ATTENTION_WIDTH = 700
_CAPACITY_STEP = 1.03  # row capacities tried: the longest sequence, then 3% wider each time
_PROBE_TOLERANCE = 1e-3  # relative; fp32 packed vs padded outputs differ by ~1e-5 (summation order)


def balanced_rows(lengths: list[int], row_tokens: int = ROW_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` grouped into ceil(total / row_tokens) rows of nearly equal total
    length: longest first, each to the currently shortest row (LPT). A row is at least as long as
    its longest sequence, so a sequence longer than ``row_tokens`` gets a row of its own size."""
    n_rows = max(1, math.ceil(sum(lengths) / row_tokens))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    totals = [0] * n_rows
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(n_rows), key=totals.__getitem__)
        rows[r].append(i)
        totals[r] += lengths[i]
    return [row for row in rows if row]


@dataclass
class Packed:
    """Sequences laid out in rows: ``input_ids`` and ``position_ids`` (N, W). Token ``t`` of
    sequence ``s`` sits in row ``row[s]``, column ``columns[first[s] + t]``. With shared
    prefixes, ``attention_mask`` (N, 1, W, W), True where a query column may attend to a key
    column; without, None (restarting position ids separate the sequences)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    row: torch.Tensor
    columns: torch.Tensor
    first: torch.Tensor
    length: torch.Tensor
    attention_mask: torch.Tensor | None = None


def pack(sequences: list[torch.Tensor], pad_id: int, row_tokens: int = ROW_TOKENS,
         share_prefixes: bool = False, attention_width: float = ATTENTION_WIDTH) -> Packed:
    """Pack 1-D token tensors into rows.

    Without ``share_prefixes``: sequences end to end in balanced rows of about ``row_tokens``
    tokens (``balanced_rows``), each with position ids restarting at 0; a row's unused tail is
    padding whose positions also restart, a segment of its own that no real token attends to.

    With ``share_prefixes``: each row is a prefix tree. Sequences are sorted, so those that
    begin alike are neighbours, and each one adds only the tokens after its longest common
    prefix with the one before; every token attends to its own path from the root, and its
    position id is its depth. The K answers to one prompt then share one copy of the prompt, and
    every sequence in a row shares the chat template's system prompt. Rows are cut where the
    cost model says (``tree_rows``, with ``attention_width``)."""
    if not share_prefixes:
        return _pack_end_to_end(sequences, pad_id, row_tokens)
    return _pack_prefix_trees(sequences, pad_id, attention_width)


def tree_rows(lengths: list[int], shared: list[int], attention_width: float = ATTENTION_WIDTH) -> list[int]:
    """Where rows start in a sorted run of sequences that share prefixes with their predecessors.

    ``lengths[j]`` is sequence j's length and ``shared[j]`` its common prefix with sequence j-1,
    so in a row it adds ``lengths[j] - shared[j]`` tokens, and all of its tokens when it opens
    the row. Every row is as wide as the widest (the rest is padding), so the batch costs
    rows * width * (1 + width / attention_width). Each capacity tried fills rows greedily; the
    cheapest layout wins. A new row repeats the shared prefix; one wide row pays for attention
    over the whole batch: the cost model weighs the two."""
    if not lengths:
        return [0]
    best: tuple[float, list[int]] | None = None
    capacity = float(max(lengths))
    while True:
        starts, used, width = [0], lengths[0], lengths[0]
        for j in range(1, len(lengths)):
            if used + lengths[j] - shared[j] > capacity:
                starts.append(j)
                used = lengths[j]
            else:
                used += lengths[j] - shared[j]
            width = max(width, used)
        cost = len(starts) * width * (1 + width / attention_width)
        if best is None or cost < best[0]:
            best = (cost, starts)
        if len(starts) == 1:  # wider capacities give this same single row
            return best[1]
        capacity *= _CAPACITY_STEP


def _pack_end_to_end(sequences: list[torch.Tensor], pad_id: int, row_tokens: int) -> Packed:
    lengths = [len(s) for s in sequences]
    rows = balanced_rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    row_of, start_of = [0] * len(sequences), [0] * len(sequences)
    for r, members in enumerate(rows):
        column = 0
        for i in members:
            input_ids[r, column : column + lengths[i]] = sequences[i]
            position_ids[r, column : column + lengths[i]] = torch.arange(lengths[i])
            row_of[i], start_of[i] = r, column
            column += lengths[i]
        position_ids[r, column:] = torch.arange(width - column)
    length = torch.tensor(lengths)
    columns = torch.cat([start_of[i] + torch.arange(n) for i, n in enumerate(lengths)]) if lengths else length
    return Packed(input_ids, position_ids, torch.tensor(row_of), columns, torch.cumsum(length, 0) - length, length)


def _pack_prefix_trees(sequences: list[torch.Tensor], pad_id: int, attention_width: float) -> Packed:
    tokens = [s.tolist() for s in sequences]
    order = sorted(range(len(tokens)), key=tokens.__getitem__)
    # Each sequence adds the tokens after its common prefix with its sorted predecessor; the
    # first of a row adds all of its tokens.
    shared = [0] + [len(os.path.commonprefix([tokens[a], tokens[b]])) for a, b in zip(order, order[1:])]
    starts = tree_rows([len(tokens[i]) for i in order], shared, attention_width)
    rows = [[(order[j], 0 if j == start else shared[j]) for j in range(start, end)]
            for start, end in zip(starts, [*starts[1:], len(order)])]  # (sequence, tokens shared in its row)
    paths: list[list[int]] = [[] for _ in tokens]  # each sequence's columns in its row
    row_of = [0] * len(tokens)
    layouts = []  # per row: (input ids, position ids)
    for r, members in enumerate(rows):
        ids: list[int] = []
        positions: list[int] = []
        previous: list[int] = []
        for i, n in members:
            path = previous[:n] + list(range(len(ids), len(ids) + len(tokens[i]) - n))
            ids += tokens[i][n:]
            positions += range(n, len(tokens[i]))
            paths[i], row_of[i], previous = path, r, path
        layouts.append((ids, positions))
    width = max(len(ids) for ids, _ in layouts)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # padding attends to itself only (a query that sees nothing would give NaN)
    attention_mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1, 1)
    for r, (ids, positions) in enumerate(layouts):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[r, : len(ids)] = torch.tensor(positions, dtype=torch.long)
    for i, path in enumerate(paths):
        index = torch.tensor(path)
        # token d of a path attends to tokens 0..d of the same path (its ancestors in the tree)
        attention_mask[row_of[i], 0, index[:, None], index[None, :]] |= torch.ones(
            len(path), len(path), dtype=torch.bool).tril()
    length = torch.tensor([len(t) for t in tokens])
    columns = torch.tensor([c for path in paths for c in path], dtype=torch.long)
    return Packed(input_ids, position_ids, torch.tensor(row_of), columns, torch.cumsum(length, 0) - length, length,
                  attention_mask)


def spans(packed: Packed, offsets: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Packed coordinates of ``counts[s]`` consecutive positions starting ``offsets[s]`` into
    sequence ``s``, flattened: (rows, columns, sequence index, index within the span), each (M,)."""
    seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = torch.cumsum(counts, 0) - counts  # where each sequence's span starts in the flat list
    within = torch.arange(int(counts.sum())) - first[seq]
    return packed.row[seq], packed.columns[packed.first[seq] + offsets[seq] + within], seq, within


def shares_prefixes(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention takes a custom 4-D mask, which prefix-tree rows need:
    transformers' SDPA and eager attention do; flash-attention kernels only know segments, so
    there sequences are packed end to end."""
    return getattr(unwrap(model).config, "_attn_implementation", None) in ("sdpa", "eager")


def hidden_states(model: torch.nn.Module, packed: Packed) -> torch.Tensor:
    """The backbone's last hidden states over the packed rows, (N, W, H): no output head, no KV
    cache (with a cache transformers would not look for packed sequences). Rows packed end to
    end get no attention mask (transformers separates sequences by their restarting position
    ids); prefix-tree rows get theirs, as a boolean mask for SDPA and an additive one for eager
    attention (which adds the mask to the scores)."""
    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    device = input_device(model)
    if {"_original_forward", "forward"} <= model.__dict__.keys() and not torch.is_autocast_enabled(device.type):
        # accelerate's mixed precision lives in the model's patched forward, which this bypasses
        # (the packing check unpatches it on purpose, to compare fp32 with fp32)
        raise RuntimeError("packed forward of an accelerate mixed-precision model outside acc.autocast(): "
                           "it would run in fp32; wrap the call in `with acc.autocast():`")
    mask = packed.attention_mask
    if mask is not None:
        mask = mask.to(device)
        if inner.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return backbone(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                    attention_mask=mask, use_cache=False).last_hidden_state


def packs_exactly(model: torch.nn.Module, what: str, padded: Callable) -> bool:
    """Whether packed forwards of ``model`` give what its padded forwards give, decided once per
    model and ``what`` (``logprobs``, ``values`` or ``rewards``: the LM head, a value head and a
    reward head are checked separately). ``padded(model, probe)`` is the plain path's function of
    the same probe input the packed one gets; the largest ``relative_gap`` must stay small."""
    if is_wrapped(model):
        return False
    verdicts = model.__dict__.setdefault("_rlhfkit_packs_exactly", {})
    verdict = verdicts.get(what)
    if verdict is None:
        packed, probe = _PACKED[what]
        was_training = model.training
        model.eval()
        device_type = input_device(model).type
        # Accelerate's mixed precision patches the instance's forward with a bf16 autocast; the
        # packed path calls the backbone, outside that patch, so the check compares the class's
        # own forward, in fp32 (in training both paths run under the same autocast).
        patched_forward = model.__dict__.pop("forward", None)
        try:
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                example = probe(model)
                verdict = bool(relative_gap(packed(model, example), padded(model, example)) < _PROBE_TOLERANCE)
        except (TypeError, ValueError, RuntimeError, AttributeError):  # no position_ids, no backbone ...
            verdict = False
        finally:
            model.train(was_training)
            if patched_forward is not None:
                model.forward = patched_forward
        if not verdict:  # said once per model and check: padded forwards are correct but slower
            warnings.warn(f"{type(unwrap(model)).__name__} gives different outputs packed and padded "
                          f"({what}); using padded forwards, which are slower", stacklevel=2)
        verdicts[what] = verdict
    return verdict


def probe_sequences(model: torch.nn.Module) -> list[torch.Tensor]:
    """Three short sequences of different lengths that share prefixes, of ordinary tokens from
    the middle of the vocabulary (special tokens at the start give extreme logits where fp32
    rounding shows)."""
    vocab = unwrap(model).get_input_embeddings().weight.shape[0]
    ordinary = (vocab // 3 + 7 * torch.arange(12)) % vocab
    # the second is a prefix of the first and the third shares its first 3 tokens: prefix-tree
    # rows must give each of them what it gets alone
    return [ordinary[:7], ordinary[:5], torch.cat([ordinary[:3], ordinary[6:12]])]


def probe_batch(model: torch.nn.Module) -> Sequences:
    """The probe sequences as three (prompt, response) pairs of different lengths."""
    sequences = probe_sequences(model)
    return join([s[:3].tolist() for s in sequences], [s[3:].tolist() for s in sequences], pad_id=0)


def probe_token_lists(model: torch.nn.Module) -> list[list[int]]:
    return [s.tolist() for s in probe_sequences(model)]


# --- the packed forwards of the seam (rlhfkit.logprobs) ---------------------------------------


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


def packed_logits(model, seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    """(logits (1, M, V) of the response tokens, their targets (1, M), and ``back``: (1, M) -> (B, R))."""
    hidden, b, t = packed_response_hidden(model, seqs)
    logits = unwrap(model).get_output_embeddings()(hidden)[None]
    targets = seqs.input_ids[:, seqs.prompt_width :][b, t][None]
    return logits, targets, lambda x: scatter_responses(x[0], b, t, seqs)


def packed_token_values(model, seqs: Sequences) -> torch.Tensor:
    """The value head at every response position, (B, R), from a packed forward."""
    hidden, b, t = packed_response_hidden(model, seqs)
    return scatter_responses(unwrap(model).score(hidden).squeeze(-1).float(), b, t, seqs)


def packed_rewards(model, sequences: list[list[int]]) -> torch.Tensor:
    """The reward head at each sequence's last token, (N,), from a packed forward."""
    packed = pack([torch.tensor(s, dtype=torch.long) for s in sequences], pad_id=0, share_prefixes=shares_prefixes(model))
    rows, columns, _, _ = spans(packed, packed.length - 1, torch.ones_like(packed.length))
    hidden = hidden_states(model, packed)
    return unwrap(model).score(hidden[rows.to(hidden.device), columns.to(hidden.device)])[:, 0].float()


def _packed_logprobs(model, seqs: Sequences) -> torch.Tensor:
    logits, targets, back = packed_logits(model, seqs)
    return back(token_logprobs(logits, targets.to(logits.device)))


# what -> (packed forward, its probe input), for packs_exactly
_PACKED: dict[str, tuple[Callable, Callable]] = {
    "logprobs": (_packed_logprobs, probe_batch),
    "values": (packed_token_values, probe_batch),
    "rewards": (packed_rewards, probe_token_lists),
}


def relative_gap(packed: torch.Tensor, padded: torch.Tensor) -> float:
    """max |packed - padded| / (1 + |padded|): rounding is ~1e-5 of a value's size; sequences
    that see each other, or wrong positions, move logprobs by whole units."""
    return float(((packed - padded).abs() / (1 + padded.abs())).max())
