"""One decoding step of a Llama-family model, with the model's own numbers and less overhead.

Profiled on SmolLM2-135M (2 CPU cores, bf16 autocast): a decoding step through the model's
``forward`` cost 23.5 ms for one row and 35.6 ms for sixteen, and reading the weights was only
about half of it. The rest was per-token overhead: 30 layers of module calls, each projection
cast by autocast and run as its own matmul, and the KV cache grown by ``torch.cat`` (a fresh copy
of every layer's keys and values, in fp32, each step).

``DecodeStep`` runs the same operations in the same order and dtypes, with three changes that
leave every result bit for bit as it was (``tests/test_decode_step.py`` compares logits exactly):

- the weights are cast once to the dtype autocast would give them (the cast is a rounding, the
  same each time); in bf16/fp16, q/k/v and gate/up are concatenated, one matmul each (oneDNN
  computes each output column the same either way; in fp32 MKL's one-row kernel does not, so
  there they stay separate);
- the KV cache is kept in that dtype, in buffers with room to grow, so a step writes one column
  instead of copying the cache; attention reads a view of the columns in use;
- attention is called directly with the mask the model would build (padding only: a step's one
  query may see every earlier column).

Models it cannot run exactly (another architecture, adapters or quantized layers in place of
plain ``nn.Linear``, sliding-window or mixed attention) get ``None`` from ``DecodeStep.build`` and
decode through their own ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlhfkit.packing import unwrap

# Architectures whose decoder layer is exactly: norm, q/k/v, rotary, attention, o, residual,
# norm, act(gate) * up, down, residual; they differ only in biases, which are read from the model.
ARCHITECTURES = ("llama", "qwen2", "mistral")
# Extra columns a cache buffer gets when it is (re)allocated: new rows joining or leaving the batch
# replace the cache anyway every few steps, so a small margin suffices.
HEADROOM = 32


class _Projections:
    """Linear layers applied to one input, their weights (and biases) cast to ``dtype``; returns
    each output. ``fuse``: one matmul over the concatenated weights. ``pack_rows``: the weights
    are reordered once into oneDNN's blocked layout for about that many input rows (``F.linear``
    reorders a bf16 weight on every call, which on CPU cost ~40% of a decoding step's matmuls)."""

    def __init__(self, linears: list[nn.Linear], dtype: torch.dtype, fuse: bool, pack_rows: int | None):
        self.sizes = [linear.out_features for linear in linears]
        if fuse and len(linears) > 1:
            weights = [_cast_into_rows([linear.weight for linear in linears], dtype)]
            biases = [None] if all(linear.bias is None for linear in linears) else \
                [_cast_into_rows([linear.weight.new_zeros(linear.out_features) if linear.bias is None else linear.bias
                                  for linear in linears], dtype)]
        else:
            weights = [linear.weight.detach().to(dtype) for linear in linears]
            biases = [None if linear.bias is None else linear.bias.detach().to(dtype) for linear in linears]
        self.biases, self.dtype = biases, dtype
        self.weights, self.linear = weights, F.linear
        if pack_rows:
            self.weights = [torch.ops.mkldnn._reorder_linear_weight(w, pack_rows) for w in weights]
            self.linear = self._packed_linear

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.weights) < len(self.sizes):
            return self.linear(x, self.weights[0], self.biases[0]).split(self.sizes, dim=-1)
        return tuple(self.linear(x, w, b) for w, b in zip(self.weights, self.biases))

    def _packed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Not an autocast op: the input gets the cast autocast would give it for F.linear.
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), weight, bias, "none", [], "")


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold prepacked weights here: bf16 on CPU (where oneDNN runs bf16
    matmuls; fp32 goes to MKL, whose results a packed oneDNN matmul would not reproduce)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@dataclass
class _Layer:
    input_norm: nn.Module
    post_norm: nn.Module
    qkv: _Projections
    o: _Projections
    gate_up: _Projections
    down: _Projections
    act: nn.Module
    scaling: float


class DecodeStep:
    """``step(tokens, positions, mask, cache)`` -> logits (B, V) for each row's next token, as
    ``model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
    past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]`` gives them with SDPA
    attention; ``cache`` (a ``DynamicCache``) gets the new column the same way. Build it inside
    the autocast context the steps run in: the weights are cast for it."""

    def __init__(self, causal_lm: nn.Module, layers: list[_Layer], head: _Projections, dtype: torch.dtype,
                 dims: tuple[int, int, int]):
        self.causal_lm = causal_lm
        self.layers = layers
        self.head = head
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
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else head.weight.dtype
        fuse = dtype in (torch.bfloat16, torch.float16)
        pack = rows if packs_weights(device, dtype) else None
        layers = []
        for layer in backbone.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
            if any(type(p) is not nn.Linear for p in projections) or getattr(attn, "is_causal", True) is not True:
                return None
            q, k, v, o, gate, up, down = projections
            layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm,
                                 _Projections([q, k, v], dtype, fuse, pack), _Projections([o], dtype, fuse, pack),
                                 _Projections([gate, up], dtype, fuse, pack), _Projections([down], dtype, fuse, pack),
                                 mlp.act_fn, attn.scaling))
        first = backbone.layers[0].self_attn
        dims = (first.q_proj.out_features // first.head_dim, first.k_proj.out_features // first.head_dim, first.head_dim)
        return cls(lm, layers, _Projections([head], dtype, fuse, pack), dtype, dims)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        backbone = self.causal_lm.model
        rows = len(tokens)
        hidden = backbone.embed_tokens(tokens[:, None])
        cos, sin = backbone.rotary_emb(hidden, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
        # The model's SDPA mask for one query per row is the padding mask, or none without padding.
        attend = None if bool(mask.all()) else mask[:, None, None, :].bool()
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        for index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_norm(hidden)
            q, k, v = layer.qkv(x)
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
            hidden = residual + layer.o(out)[0]
            residual = hidden
            gate, up = layer.gate_up(layer.post_norm(hidden))
            hidden = residual + layer.down(layer.act(gate) * up)[0]
        return self.head(backbone.norm(hidden))[0][:, -1]

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
        self._views[index] = (keys, values)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)



def _cast_into_rows(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors stacked along their first dimension in ``dtype``: each one is read once and
    written once, cast on the way (a cast then ``torch.cat`` would copy twice)."""
    out = tensors[0].new_empty((sum(len(t) for t in tensors), *tensors[0].shape[1:]), dtype=dtype)
    start = 0
    for tensor in tensors:
        out[start : start + len(tensor)].copy_(tensor.detach())
        start += len(tensor)
    return out
