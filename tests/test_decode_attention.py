"""The decoding loop's one-query attention against attention written out by hand."""

import pytest
import torch

from rlhfkit import decode_attention as da


def by_hand(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v with every query head reading key head h // group; (B, Q, Hq, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2)


def inputs(queries=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 6, queries, 8, generator=g)  # 6 query heads over 2 key/value heads
    k, v = torch.randn(3, 2, 5, 8, generator=g), torch.randn(3, 2, 5, 8, generator=g)
    mask = torch.ones(3, 1, queries, 5, dtype=torch.bool)
    mask[0, ..., :2] = False  # a left-padded row
    mask[2, ..., :1] = False
    return q, k, v, mask


@pytest.mark.parametrize("kind", ["bool", "additive", "none"])
def test_one_query_matches_attention_by_hand(kind):
    q, k, v, mask = inputs()
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif kind == "none":
        mask = None
    out, weights = da.decode_attention(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (3, 1, 6, 8)
    torch.testing.assert_close(out, by_hand(q, k, v, mask, 0.3), atol=1e-6, rtol=1e-6)


def test_padding_columns_are_ignored_and_bf16_is_computed_in_fp32():
    q, k, v, mask = inputs()
    q, k, v = (3 * q).bfloat16(), (3 * k).bfloat16(), v.bfloat16()  # peaked scores, as trained models have
    expected = by_hand(q.double(), k.double(), v.double(), mask, 0.3)  # exact math on the bf16 inputs
    k[0, :, :2], v[0, :, :2] = 100.0, -100.0  # what row 0 must not see
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = da.decode_attention(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    assert out.dtype == torch.bfloat16
    # fp32 math: only the output's rounding to bf16 (~2^-8 relative); scores rounded to bf16 miss this
    torch.testing.assert_close(out.double(), expected, atol=5e-3, rtol=5e-3)


def test_several_queries_or_dropout_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(da, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("sdpa", None))
    q, k, v, mask = inputs(queries=2)
    assert da.decode_attention(torch.nn.Module(), q, k, v, mask)[0] == "sdpa"
    q, k, v, mask = inputs()
    assert da.decode_attention(torch.nn.Module(), q, k, v, mask, dropout=0.1)[0] == "sdpa"
    assert da.decode_attention(torch.nn.Module(), q, k, v, mask, softcap=30.0)[0] == "sdpa"
    assert len(calls) == 3
