"""CPU prefill attention: the C kernel, the stacked-bmm path and SDPA equal a float64 reference, fresh or over a
cached prefix, one chunk or several in a step next to decode rows."""
from __future__ import annotations

import pytest
import torch

from shardserve.model.forward_batch import SeqChunk, build_forward_batch
from shardserve.model.layers import attention
from shardserve.kernels.cpu import native, native_attention
from shardserve.model.layers.attention import PagedAttention

PATHS = ["kernel", "stacked", "sdpa"]


def _use_path(monkeypatch, path):
    if path == "kernel" and not native.available():
        pytest.skip("the C kernels are not built here (no gcc)")
    if path != "kernel":
        monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "torch")
    if path == "sdpa":
        monkeypatch.setattr(attention, "_STACKED_MAX_SCORES", 0)      # every chunk takes SDPA


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _reference(q, k, v, start, scale):
    """q [n, Hq, hd], k/v [ctx, Hk, hd], query i at position start + i -> [n, Hq, hd] in float64."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= start + torch.arange(n)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 2)])
@pytest.mark.parametrize("start,n", [(0, 1), (0, 37), (16, 20), (45, 3)])
def test_prefill_matches_reference(monkeypatch, path, heads, kv_heads, start, n):
    _use_path(monkeypatch, path)
    hd, block_size = 16, 8
    gen = torch.Generator().manual_seed(heads * 1000 + start * 10 + n)
    ctx = start + n
    blocks = list(range(1, -(-ctx // block_size) + 1))
    attn = PagedAttention(heads, kv_heads, hd, hd ** -0.5)
    attn.bind_cache(torch.zeros((len(blocks) + 1) * block_size, kv_heads, hd),
                    torch.zeros((len(blocks) + 1) * block_size, kv_heads, hd))
    k_all = torch.randn(ctx, kv_heads, hd, generator=gen)
    v_all = torch.randn(ctx, kv_heads, hd, generator=gen)
    attn.k_cache[block_size: block_size + start] = k_all[:start]       # the cached prefix (blocks 1, 2, ...)
    attn.v_cache[block_size: block_size + start] = v_all[:start]
    batch = build_forward_batch([SeqChunk([7] * n, start, blocks, sample=True)], block_size, torch.device("cpu"))
    q = torch.randn(n, heads, hd, generator=gen)
    out = attn(q, k_all[start:], v_all[start:], batch).view(n, heads, hd)
    torch.testing.assert_close(out.double(), _reference(q, k_all, v_all, start, hd ** -0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (8, 1, 128), (6, 2, 48)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_step_of_several_chunks_matches_reference(monkeypatch, restore_threads, path, heads, kv_heads, hd, threads):
    """Two decode rows, then chunks of 70 fresh tokens, 100 tokens over a 45-token cached prefix, 1 token over 17
    and 33 fresh, their blocks shuffled over the cache: every chunk's rows equal the reference, decode rows too."""
    _use_path(monkeypatch, path)
    torch.set_num_threads(threads)
    block_size, scale = 16, hd ** -0.5
    gen = torch.Generator().manual_seed(heads * 100 + hd + threads)
    chunks_spec = [(0, 70), (45, 100), (17, 1), (0, 33)]            # (cached tokens, chunk tokens)
    decode_ctx = [29, 5]
    lengths = decode_ctx + [s + n for s, n in chunks_spec]
    free = torch.randperm(sum(-(-c // block_size) for c in lengths) + 8, generator=gen).add(1).tolist()
    attn = PagedAttention(heads, kv_heads, hd, scale)
    attn.bind_cache(torch.zeros((len(free) + 1) * block_size, kv_heads, hd),
                    torch.zeros((len(free) + 1) * block_size, kv_heads, hd))
    seqs = []                       # (chunk, full K, full V, cached tokens)
    for ctx, cached in zip(lengths, [c - 1 for c in decode_ctx] + [s for s, _ in chunks_spec]):
        blocks = [free.pop() for _ in range(-(-ctx // block_size))]
        k_all, v_all = (torch.randn(ctx, kv_heads, hd, generator=gen) for _ in range(2))
        for p in range(cached):      # the cached part is already in the blocks
            slot = blocks[p // block_size] * block_size + p % block_size
            attn.k_cache[slot], attn.v_cache[slot] = k_all[p], v_all[p]
        seqs.append((SeqChunk([3] * (ctx - cached), cached, blocks, sample=True), k_all, v_all, cached))
    batch = build_forward_batch([s[0] for s in seqs], block_size, torch.device("cpu"))
    assert batch.num_decode == 2 and len(batch.prefills) == 4
    total = batch.num_tokens
    qkv = torch.randn(total, (heads + 2 * kv_heads) * hd, generator=gen)      # q is a strided view, as in a model
    q = qkv[:, : heads * hd].view(total, heads, hd)
    k = torch.cat([ka[c:] for _, ka, _, c in seqs])
    v = torch.cat([va[c:] for _, _, va, c in seqs])
    out = attn(q, k, v, batch).view(total, heads, hd)
    row = 0
    for chunk, k_all, v_all, cached in seqs:
        n = len(chunk.token_ids)
        expected = _reference(q[row: row + n], k_all, v_all, cached, scale)
        torch.testing.assert_close(out[row: row + n].double(), expected, rtol=1e-5, atol=1e-5)
        row += n


def test_path_choice(monkeypatch):
    """The C kernel when it is built; without it, stacked bmm for short chunks and SDPA past the limit."""
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa") or real_sdpa(*a, **k))
    real_kernel = native_attention.prefill
    monkeypatch.setattr(native_attention, "prefill", lambda *a, **k: calls.append("kernel") or real_kernel(*a, **k))
    real_bmm = torch.bmm
    monkeypatch.setattr(attention.torch, "bmm", lambda *a, **k: calls.append("bmm") or real_bmm(*a, **k))
    attn = PagedAttention(4, 2, 16, 0.25)
    attn.bind_cache(torch.zeros(64, 2, 16), torch.zeros(64, 2, 16))
    batch = build_forward_batch([SeqChunk([1] * 10, 0, [1, 2], sample=True)], 8, torch.device("cpu"))
    args = (torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16), batch)
    if native.available():
        attn(*args)
        assert calls == ["kernel"]
        calls.clear()
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "torch")
    attn.bind_cache(torch.zeros(64, 2, 16), torch.zeros(64, 2, 16))          # the path is chosen when bound
    attn(*args)
    assert calls == ["bmm"]
    monkeypatch.setattr(attention, "_STACKED_MAX_SCORES", 99)                  # 10 x 10 > 99: SDPA
    attn(*args)
    assert calls == ["bmm", "sdpa"]
