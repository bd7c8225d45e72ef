"""The float32 GEMM kernels (linear_f32.c) on panel-packed weights equal F.linear (and, fused, SiLU * up), and the
linear layers use them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve.distributed.parallel_state import ParallelGroup
from shardserve.kernels.cpu import fused_ops, native, native_linear
from shardserve.model.layers.linear import MergedColumnParallelLinear, ReplicatedLinear

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels are not built here (no gcc)")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _expected(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("rows", [1, 7, 64, 300, 600])          # partial row tiles; several 256-row chunks
@pytest.mark.parametrize("n,k", [(960, 576), (40, 24), (23, 5), (3 * 48 + 16, 33)])   # partial panels and groups
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_matches_linear(restore_threads, rows, n, k, threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(rows * 7 + n + k)
    x, w, b = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    packed = native_linear.pack(w)
    assert packed.shape == (-(-n // 16), k, 16)
    for bias in (None, b):
        out = native_linear.linear(x, packed, bias, n)
        assert out.shape == (rows, n) and out.is_contiguous()
        torch.testing.assert_close(out.double(), _expected(x, w, bias), rtol=1e-5, atol=1e-4)


def test_strided_and_batched_inputs():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(50, 40, generator=gen)
    packed = native_linear.pack(w)
    wide = torch.randn(9, 100, generator=gen)
    view = wide[:, 10:50]                                   # row stride 100
    torch.testing.assert_close(native_linear.linear(view, packed, None, 50).double(), _expected(view, w, None),
                               rtol=1e-5, atol=1e-4)
    cols = torch.randn(40, 9, generator=gen).t()            # column-major: copied first
    torch.testing.assert_close(native_linear.linear(cols, packed, None, 50).double(), _expected(cols, w, None),
                               rtol=1e-5, atol=1e-4)
    x3 = torch.randn(2, 5, 40, generator=gen)
    assert native_linear.linear(x3, packed, None, 50).shape == (2, 5, 50)


def test_torch_fallback_on_packed_weights(monkeypatch):
    """Switching the kernels off after packing still gives the product (through torch)."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(6, 24, generator=gen), torch.randn(20, 24, generator=gen), torch.randn(20, generator=gen)
    packed = native_linear.pack(w)
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "torch")
    torch.testing.assert_close(native_linear.linear(x, packed, b, 20).double(), _expected(x, w, b),
                               rtol=1e-5, atol=1e-4)


def test_layer_prepacks_into_panels(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    layer = ReplicatedLinear(48, 37, bias=True)
    w, b = torch.randn(37, 48, generator=gen), torch.randn(37, generator=gen)
    layer.weight.data.copy_(w)
    layer.bias.data.copy_(b)
    layer.process_weights_after_loading()
    calls = []
    real = native_linear.linear
    monkeypatch.setattr(native_linear, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(5, 48, generator=gen)
    out = layer(x)
    expect_panels = native_linear.preferred()
    assert (layer.packed_rows == 37) == expect_panels and calls == ([1] if expect_panels else [])
    assert layer.weight.numel() == 0                       # the plain copy is released
    torch.testing.assert_close(out.double(), _expected(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("inter,k", [(768, 576), (16, 40), (48, 24)])      # 2 pairs per tile, and a lone pair
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_silu_gemm(restore_threads, rows, inter, k, threads):
    """silu(x Wg^T) * (x Wu^T) from one GEMM equals the reference, and bit for bit the unfused kernels."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(rows + inter + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(2 * inter, k, generator=gen) * 0.3
    packed = native_linear.pack_gate_up(w)
    out = native_linear.silu_linear(x, packed, inter)
    gate, up = _expected(x, w, None).split(inter, dim=-1)
    # float32 sums of k products (|gate|, |up| up to ~20 here), then a product of two rounded values
    torch.testing.assert_close(out.double(), F.silu(gate) * up, rtol=1e-4, atol=1e-3)
    gate_up = native_linear.gate_up_columns(native_linear.linear(x, packed, None, 2 * inter))
    assert torch.equal(out, fused_ops.silu_and_mul(gate_up))


def test_fused_silu_torch_fallback(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    x, w = torch.randn(5, 24, generator=gen), torch.randn(64, 24, generator=gen)
    packed = native_linear.pack_gate_up(w)
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", "torch")
    gate, up = _expected(x, w, None).split(32, dim=-1)
    torch.testing.assert_close(native_linear.silu_linear(x, packed, 32).double(), F.silu(gate) * up,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("inter,fused", [(32, True), (20, False)])   # a shard not a multiple of 16 stays unfused
def test_gate_up_layer(inter, fused):
    gen = torch.Generator().manual_seed(inter)
    layer = MergedColumnParallelLinear(24, [inter, inter], ParallelGroup(ranks=[0], rank_in_group=0))
    w = torch.randn(2 * inter, 24, generator=gen)
    layer.weight.data.copy_(w)
    layer.process_weights_after_loading()
    x = torch.randn(3, 24, generator=gen)
    assert layer.gate_up_silu == (fused and native_linear.preferred())
    torch.testing.assert_close(layer(x).double(), _expected(x, w, None), rtol=1e-5, atol=1e-4)   # [gate | up]
    act = layer.silu_and_mul(x)
    if layer.gate_up_silu:
        gate, up = _expected(x, w, None).split(inter, dim=-1)
        torch.testing.assert_close(act.double(), F.silu(gate) * up, rtol=1e-5, atol=1e-4)
    else:
        assert act is None
