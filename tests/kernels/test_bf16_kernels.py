"""The bfloat16 kernels: the VDPBF16PS GEMM (linear_bf16.c) against a float64 reference, the attention kernels over a
bf16 KV cache equal to the float32 ones over the same numbers, and rounding / cache writes equal to torch's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve.kernels.cpu import bf16_linear, fused_ops, native, native_attention

pytestmark = pytest.mark.skipif(not bf16_linear.supported(),
                                reason="the C kernels are not built for AVX512-BF16 here (no gcc, or an older CPU)")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _bf16_values(*shape, gen):
    """float32 tensor holding bfloat16 values (what a bf16 model's activations hold)."""
    return torch.randn(*shape, generator=gen).bfloat16().float()


def test_pack_round_trips():
    gen = torch.Generator().manual_seed(0)
    for n, k in [(23, 5), (20, 2), (40, 33)]:
        w = torch.randn(n, k, generator=gen).bfloat16()
        packed = bf16_linear.pack(w)
        assert packed.shape == (-(-n // 16), -(-k // 2), 16, 2)
        assert torch.equal(bf16_linear.unpack(packed, n, k), w)      # pair j of row n: (w[n, 2j], w[n, 2j + 1])
        assert packed[0, 0, 1, 1] == w[1, 1] and packed[1, (k - 1) // 2, 3, (k - 1) % 2] == w[19, k - 1]
        if k % 2:
            assert not packed[:, -1, :, 1].any()                                   # the pad past K is zero


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 64, 300])            # decode tiles, partial 8-row tiles, 256-row chunks
@pytest.mark.parametrize("n,k", [(960, 576), (40, 24), (23, 5), (3 * 48 + 16, 33)])   # partial panels, groups, odd K
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_matches_float64_and_is_row_independent(restore_threads, rows, n, k, threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(rows * 7 + n + k)
    x, w, b = _bf16_values(rows, k, gen=gen), torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, generator=gen)
    packed = bf16_linear.pack(w)
    for bias in (None, b):
        out = bf16_linear.linear(x, packed, bias, n, k)
        assert out.shape == (rows, n) and out.dtype == torch.float32
        expected = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
        # each output is one fixed chain of products: the same bits whatever M, the tile or the thread split
        assert torch.equal(bf16_linear.linear(x[-1:], packed, bias, n, k), out[-1:])


def test_inputs_are_rounded_to_bf16_and_may_be_strided():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(50, 40, generator=gen).bfloat16()
    packed = bf16_linear.pack(w)
    wide = torch.randn(9, 100, generator=gen)
    view = wide[:, 10:50]                                     # row stride 100, values not bf16
    out = bf16_linear.linear(view, packed, None, 50, 40)
    assert torch.equal(out, bf16_linear.linear(view.bfloat16().float().contiguous(), packed, None, 50, 40))
    torch.testing.assert_close(out.double(), F.linear(view.bfloat16().double(), w.double()), rtol=1e-5, atol=1e-4)
    batched = bf16_linear.linear(view.reshape(3, 3, 40), packed, None, 50, 40)
    assert batched.shape == (3, 3, 50) and torch.equal(batched.reshape(9, 50), out)


def test_bad_shapes_are_refused():
    packed = bf16_linear.pack(torch.zeros(20, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="K=8"):
        bf16_linear.linear(torch.zeros(2, 9), packed, None, 20, 8)
    with pytest.raises(ValueError, match="bf16 panels"):
        bf16_linear.linear(torch.zeros(2, 8), packed.float(), None, 20, 8)


def test_rounding_equals_torch_including_special_values():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 37, generator=gen) * 1e3
    x[0, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3.4e38])
    x[1, :3] = torch.tensor([1.00390625, 1.01171875, -1.00390625])      # ties: to even
    view = torch.zeros(5, 50)[:, 3:40]
    view.copy_(x)
    assert fused_ops.round_bf16_(view)
    expected = x.bfloat16().float()
    assert torch.equal(view.nan_to_num(), expected.nan_to_num()) and bool(view[0, 0].isnan())


def test_kv_write_into_bf16_cache_rounds_as_torch():
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(6, 2, 32, generator=gen), torch.randn(6, 2, 32, generator=gen)
    slots = torch.tensor([9, 0, 4, 15, 3, 7])
    caches = torch.zeros(16, 2, 32, dtype=torch.bfloat16), torch.zeros(16, 2, 32, dtype=torch.bfloat16)
    assert fused_ops.write_kv(k, v, slots, *caches)
    assert torch.equal(caches[0][slots], k.bfloat16()) and torch.equal(caches[1][slots], v.bfloat16())
    assert not caches[0][[1, 2]].any()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (3, 1, 32)])
def test_attention_over_bf16_cache_equals_float32_over_the_same_numbers(restore_threads, heads, kv_heads, head_dim):
    """bf16 K/V are widened exactly as they are read: decode and prefill give the float32 kernels' bits."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(heads + head_dim)
    slots_total = 256
    k_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots_total, kv_heads, head_dim, generator=gen).bfloat16()
    scale = head_dim ** -0.5
    lens = torch.tensor([1, 17, 200, 40])
    slots = torch.stack([torch.randperm(slots_total, generator=gen)[:200] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    got = native_attention.paged_decode(q, k_cache, v_cache, slots, lens, scale)
    want = native_attention.paged_decode(q, k_cache.float(), v_cache.float(), slots, lens, scale)
    assert torch.equal(got, want)
    # two prefill chunks: 30 queries over 30 keys, then 5 queries after a 20-key cached prefix
    segs = torch.tensor([[0, 30, 30, 0], [30, 5, 25, 30]])
    ctx_slots = torch.randperm(slots_total, generator=gen)[:55]
    qp = torch.randn(35, heads, head_dim, generator=gen)
    outs = []
    for kc, vc in ((k_cache, v_cache), (k_cache.float(), v_cache.float())):
        out = torch.zeros(35, heads, head_dim)
        native_attention.prefill(qp, kc, vc, (segs, ctx_slots), scale, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().sum() > 0
    assert native.available()
