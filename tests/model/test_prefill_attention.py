"""CPU prefill attention: the stacked-bmm path equals SDPA and a float64 reference, fresh or over a cached prefix."""
from __future__ import annotations

import pytest
import torch

from shardserve.model.forward_batch import SeqChunk, build_forward_batch
from shardserve.model.layers import attention
from shardserve.model.layers.attention import PagedAttention


def _reference(q, k, v, start, scale):
    """q [n, Hq, hd], k/v [ctx, Hk, hd], query i at position start + i -> [n, Hq, hd] in float64."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= start + torch.arange(n)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("start,n", [(0, 1), (0, 37), (16, 20), (45, 3)])
def test_prefill_matches_reference(monkeypatch, stacked, heads, kv_heads, start, n):
    if not stacked:
        monkeypatch.setattr(attention, "_STACKED_MAX_SCORES", 0)      # every chunk takes SDPA
    hd, block_size = 16, 8
    gen = torch.Generator().manual_seed(heads * 1000 + start * 10 + n)
    ctx = start + n
    blocks = list(range(1, -(-ctx // block_size) + 1))
    attn = PagedAttention(heads, kv_heads, hd, hd ** -0.5)
    attn.k_cache = torch.zeros((len(blocks) + 1) * block_size, kv_heads, hd)
    attn.v_cache = torch.zeros_like(attn.k_cache)
    k_all = torch.randn(ctx, kv_heads, hd, generator=gen)
    v_all = torch.randn(ctx, kv_heads, hd, generator=gen)
    attn.k_cache[block_size: block_size + start] = k_all[:start]       # the cached prefix (blocks 1, 2, ...)
    attn.v_cache[block_size: block_size + start] = v_all[:start]
    batch = build_forward_batch([SeqChunk([7] * n, start, blocks, sample=True)], block_size, torch.device("cpu"))
    q = torch.randn(n, heads, hd, generator=gen)
    out = attn(q, k_all[start:], v_all[start:], batch).view(n, heads, hd)
    torch.testing.assert_close(out.double(), _reference(q, k_all, v_all, start, hd ** -0.5), rtol=1e-5, atol=1e-5)


def test_stacked_path_is_taken_for_short_chunks(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    attn = PagedAttention(4, 2, 16, 0.25)
    attn.k_cache = attn.v_cache = torch.zeros(64, 2, 16)
    batch = build_forward_batch([SeqChunk([1] * 10, 0, [1, 2], sample=True)], 8, torch.device("cpu"))
    attn(torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16), batch)
    assert calls == []
    monkeypatch.setattr(attention, "_STACKED_MAX_SCORES", 99)                  # 10 x 10 > 99: SDPA
    attn(torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16), batch)
    assert calls == [1]
