"""The C paged decode-attention kernel equals the torch gather path, over GQA group sizes, lengths and block layouts."""
from __future__ import annotations

import random

import pytest
import torch

from shardserve.model.forward_batch import SeqChunk, build_forward_batch
from shardserve.kernels.cpu import native, native_attention
from shardserve.model.layers.attention import PagedAttention

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="no C compiler here (or SHARDSERVE_CPU_KERNELS=torch): kernel not built")


def _decode_step(heads: int, kv_heads: int, head_dim: int, lengths: list[int], block_size: int, seed: int):
    """A PagedAttention with random caches, and one decode batch whose sequences own shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_each = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_each) + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)                                        # contexts scattered over the cache, as after churn
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim ** -0.5)
    attn.bind_cache(torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen),
                    torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen))
    chunks = []
    for n, nb in zip(lengths, blocks_each):
        owned, free = free[:nb], free[nb:]
        chunks.append(SeqChunk(token_ids=[5], start=n - 1, block_ids=owned, sample=True))
    batch = build_forward_batch(chunks, block_size, torch.device("cpu"))
    assert batch.num_decode == len(lengths) and not batch.prefills
    b = len(lengths)
    q = torch.randn(b, heads, head_dim, generator=gen)
    k = torch.randn(b, kv_heads, head_dim, generator=gen)
    v = torch.randn(b, kv_heads, head_dim, generator=gen)
    return attn, batch, q, k, v


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 32), (3, 1, 64)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_kernel_equals_torch_path(monkeypatch, heads, kv_heads, head_dim, block_size):
    lengths = [2, 3, 17, 64, 300, 33]          # a decode sees its prompt (>= 1 token) plus the new token
    attn, batch, q, k, v = _decode_step(heads, kv_heads, head_dim, lengths, block_size, seed=heads * 100 + block_size)
    caches = attn.k_cache.clone(), attn.v_cache.clone()
    fused = attn(q, k, v, batch)
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "torch")
    assert not native.available()
    attn.bind_cache(*caches)                                 # bound with the kernels off: the torch path
    reference = attn(q, k, v, batch)
    assert fused.shape == reference.shape == (len(lengths), heads * head_dim)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("lengths", [[7], [600, 2, 2, 3, 2], [2, 2, 2, 2, 2, 2, 2, 900], [40] * 5, [3, 200, 3, 200, 3]])
def test_every_sequence_done_once_whatever_the_thread_split(monkeypatch, threads, lengths):
    """Threads take runs of sequences by token share (some get none); each sequence is attended exactly once."""
    attn, batch, q, k, v = _decode_step(9, 3, 64, lengths, 16, seed=len(lengths) + threads)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    caches = attn.k_cache.clone(), attn.v_cache.clone()
    fused = attn(q, k, v, batch)
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "torch")
    attn.bind_cache(*caches)
    torch.testing.assert_close(fused, attn(q, k, v, batch), rtol=1e-5, atol=2e-6)


def test_kernel_is_what_decode_uses(monkeypatch):
    calls = []
    real = native_attention.paged_decode
    monkeypatch.setattr(native_attention, "paged_decode", lambda *a: calls.append(1) or real(*a))
    attn, batch, q, k, v = _decode_step(9, 3, 64, [5, 40], 16, seed=1)
    attn(q, k, v, batch)
    assert calls == [1]


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="SHARDSERVE_CPU_KERNELS='fast': expected 'native' or 'torch'"):
        native.available()
