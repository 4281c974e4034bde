"""One decoding step of a Llama-family model, with the model's own numbers and less overhead.

A decoding step through the model's ``forward`` spends its time on two things besides the math
(profile in bench/README.md, "Measurements behind the code's choices"): ``F.linear`` reorders a
bf16 weight for oneDNN on every call, and per-token overhead: 30 layers of module calls,
autocast's casts, and the KV cache grown by ``torch.cat`` (a fresh copy of every layer's keys
and values, in fp32, each step).

``DecodeStep`` runs the same operations in the same order and dtypes, with three changes that
leave every result bit for bit as it was (``tests/test_decode_step.py`` compares logits exactly):

- the weights are cast once to the dtype autocast would give them (the cast is a rounding, the
  same each time) and, for bf16 on CPU, reordered once into oneDNN's blocked layout, which
  ``F.linear`` redoes on every call; the prompts' prefill through the model's ``forward`` uses
  them too (``model_uses_cast_weights``);
- the KV cache is kept in that dtype, in buffers with room to grow, so a step writes one column
  instead of copying the cache; attention reads a view of the columns in use;
- attention is called directly, as transformers calls SDPA, with the mask the model would build
  (padding only: a step's one query may see every earlier column) converted once per step to
  the additive form SDPA would convert it to in every layer.

The exactness is tested on CPU. On CUDA (weights cast once, no packing) it has not been run:
cuBLAS and SDPA may choose other kernels for the same math there, and differ in the last bits.

Models it cannot run exactly (another architecture, adapters or quantized layers in place of
plain ``nn.Linear``, sliding-window or mixed attention) get ``None`` from ``DecodeStep.build`` and
decode through their own ``forward``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlhfkit.models import unwrap

# Architectures whose decoder layer is exactly: norm, q/k/v, rotary, attention, o, residual,
# norm, act(gate) * up, down, residual; they differ only in biases, which are read from the model.
ARCHITECTURES = ("llama", "qwen2", "mistral")
# Extra columns a cache buffer gets when it is (re)allocated: new rows joining or leaving the batch
# replace the cache anyway every few steps, so a small margin suffices.
HEADROOM = 32


class _Linear:
    """``linear`` with its weight (and bias) cast once to ``dtype``, as autocast would cast them
    on every call. ``pack_rows``: the weight is also reordered once into oneDNN's blocked layout
    for about that many input rows; ``F.linear`` reorders a bf16 weight on every call."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, pack_rows: int | None):
        self.dtype = dtype
        self.weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        if pack_rows:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, pack_rows)
        self.packed = bool(pack_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:  # not an autocast op: the input gets the cast autocast would give it
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold prepacked weights here: bf16 on CPU (where oneDNN runs bf16
    matmuls; fp32 goes to MKL, whose results a packed oneDNN matmul would not reproduce)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _onednn_packs_bf16()


@functools.cache
def _onednn_packs_bf16() -> bool:
    """Whether this CPU lets oneDNN pack bf16 weights: it refuses without avx_ne_convert or
    AVX-512 BW/VL/DQ (e.g. on AVX2-only Zen 3), a capability torch exposes no check for."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


@dataclass
class _Layer:
    input_norm: nn.Module
    post_norm: nn.Module
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    gate: _Linear
    up: _Linear
    down: _Linear
    act: nn.Module
    scaling: float


class DecodeStep:
    """``step(tokens, positions, mask, cache)`` -> logits (B, V) for each row's next token, as
    ``model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
    cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]`` gives them with SDPA
    attention; ``cache`` (a ``DynamicCache``) gets the new column the same way. Build it inside
    the autocast context the steps run in: the weights are cast for it."""

    def __init__(self, causal_lm: nn.Module, layers: list[_Layer], head: _Linear, dtype: torch.dtype,
                 dims: tuple[int, int, int], linears: dict[nn.Linear, _Linear]):
        self.causal_lm = causal_lm
        self.layers = layers
        self.head = head
        self.linears = linears  # the model's linear layers and their cast copies
        self.dtype = dtype  # of the weights, and of the KV cache (attention would round it to that)
        self.heads, self.kv_heads, self.head_dim = dims
        self._views: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)

    @classmethod
    def build(cls, model: nn.Module, rows: int = 16) -> DecodeStep | None:
        """The step for ``model`` (maybe wrapped by PEFT), or None where it could not give the
        model's own numbers. ``rows``: about how many rows a step will have (for weight packing)."""
        lm = unwrap(model)  # under PEFT, LoRA layers replace nn.Linear: the checks below refuse them
        config = getattr(lm, "config", None)
        backbone = getattr(lm, "model", None)
        if config is None or getattr(config, "model_type", None) not in ARCHITECTURES or backbone is None:
            return None
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return None
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
            return None
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        if type(head) is not nn.Linear or head.bias is not None or not hasattr(backbone, "rotary_emb"):
            return None
        device = head.weight.device
        if device.type != "cpu":  # measured and checked on CPU only; a GPU decodes through the model's forward
            return None
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else head.weight.dtype
        pack = rows if packs_weights(device, dtype) else None
        linears = {}
        layers = []
        for layer in backbone.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
            if any(type(p) is not nn.Linear for p in projections) or getattr(attn, "is_causal", True) is not True:
                return None
            for linear in projections:
                linears[linear] = _Linear(linear, dtype, pack)
            layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm,
                                 *(linears[linear] for linear in projections), mlp.act_fn, attn.scaling))
        linears[head] = _Linear(head, dtype, pack)
        first = backbone.layers[0].self_attn
        head_dim = first.head_dim
        dims = (first.q_proj.out_features // head_dim, first.k_proj.out_features // head_dim, head_dim)
        return cls(lm, layers, linears[head], dtype, dims, linears)

    @contextlib.contextmanager
    def model_uses_cast_weights(self):
        """Within: the model's own linear layers compute with the cast (and packed) weights, so its
        forward (the prompts' prefill) skips autocast's casting and oneDNN's reordering of every
        weight; the results are the same bit for bit. The layers' forwards are restored after."""
        own = {linear: linear.__dict__.get("forward") for linear in self.linears}  # a hook's wrapper, if any
        for linear, cast in self.linears.items():
            linear.forward = cast
        try:
            yield
        finally:
            for linear, forward in own.items():
                if forward is None:
                    del linear.forward
                else:
                    linear.forward = forward

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        backbone = self.causal_lm.model
        rows = len(tokens)
        hidden = backbone.embed_tokens(tokens[:, None])
        cos, sin = backbone.rotary_emb(hidden, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        # The model's SDPA mask for one query per row is the padding mask, or none without padding.
        attend = None if bool(mask.all()) else _additive_mask(mask[:, None, None, :].bool(), self.dtype)
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_norm(hidden)
            q, k, v = layer.q(x), layer.k(x), layer.v(x)
            q = q.view(rows, 1, h, d).transpose(1, 2)
            k = k.view(rows, 1, kv, d).transpose(1, 2)
            v = v.view(rows, 1, kv, d).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            keys, values = self._append(index, cache.layers[index], k, v)
            if attend is None or kv == h:  # as transformers calls SDPA: grouped-query heads by SDPA itself
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=layer.scaling,
                                                     enable_gqa=kv != h)
            else:  # with a mask, the query heads sharing a key/value head become its queries (pack_gqa)
                out = F.scaled_dot_product_attention(q.reshape(rows, kv, h // kv, d), keys, values,
                                                     attn_mask=attend, scale=layer.scaling)
            out = out.reshape(rows, h, 1, d).transpose(1, 2).contiguous().reshape(rows, 1, h * d)
            hidden = residual + layer.o(out)
            residual = hidden
            x = layer.post_norm(hidden)
            hidden = residual + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        return self.head(backbone.norm(hidden))[:, -1]

    def _append(self, index: int, layer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new column into this layer's buffers and return the columns in use. A cache
        the decoding loop has replaced since (rows joined or left) is copied into new buffers."""
        view = self._views[index]
        if view is None or layer.keys is not view[0] or layer.values is not view[1] \
                or view[0].shape[2] == self._buffers[index][0].shape[2]:
            self._adopt(index, layer.keys, layer.values)
        key_buffer, value_buffer = self._buffers[index]
        used = layer.keys.shape[2]
        key_buffer[:, :, used : used + 1] = k
        value_buffer[:, :, used : used + 1] = v
        layer.keys, layer.values = key_buffer[:, :, : used + 1], value_buffer[:, :, : used + 1]
        self._views[index] = (layer.keys, layer.values)
        return layer.keys, layer.values

    def _adopt(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        rows, heads, used, dim = keys.shape
        key_buffer = keys.new_empty((rows, heads, used + HEADROOM, dim), dtype=self.dtype)
        value_buffer = values.new_empty((rows, heads, used + HEADROOM, values.shape[-1]), dtype=self.dtype)
        key_buffer[:, :, :used] = keys  # the rounding attention would apply to them anyway
        value_buffer[:, :, :used] = values
        self._buffers[index] = (key_buffer, value_buffer)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's own conversion of a boolean mask (0 where allowed, -inf elsewhere, in the queries'
    dtype), done once per step instead of in each layer's attention call."""
    return torch.zeros_like(allowed, dtype=dtype).masked_fill_(~allowed, float("-inf"))
