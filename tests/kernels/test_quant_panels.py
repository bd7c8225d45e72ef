"""The k-major panel kernels (quant_panels.c) on GGUF Q8_0 / Q4_0 / Q4_1 weights repacked at load: the repack is a
lossless reorder of the same bytes, the products match float64 products of gguf's dequantized weights within
float32 summation rounding, and each output is bitwise independent of M, the thread count, the register tile, the
other rows and x's row stride (one FMA chain over ascending k), the scalar path included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from product_bound import check_product
from shardserve.kernels.cpu import native, quant_linear, quant_panels

needs_kernels = pytest.mark.skipif(not native.available(), reason="the C kernels are not built here (no gcc)")
FORMATS = list(quant_panels.FORMATS)
SHAPES = [(37, 96), (64, 576), (100, 160), (48, 32), (16, 1536)]     # (N, K): odd N pads the last panel


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _case(fmt: str, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    qtype = GGMLQuantizationType[fmt]
    blocks = gguf_quantize(w, qtype)
    return torch.from_numpy(blocks), gguf_dequantize(blocks, qtype).astype(np.float64)


def test_supports():
    assert all(quant_panels.supports(f) for f in ("Q8_0", "Q4_0", "Q4_1"))
    assert not any(quant_panels.supports(f) for f in ("Q4_K", "Q5_K", "Q6_K", "I8", "F16"))
    with pytest.raises(ValueError):
        quant_panels.repack(torch.zeros(16, 144, dtype=torch.uint8), "Q4_K", 256)


@pytest.mark.parametrize("fmt", FORMATS)
def test_repack_is_a_lossless_reorder(fmt):
    for n, k in SHAPES:
        weight, _ = _case(fmt, n, k, seed=n + k)
        packed = quant_panels.repack(weight, fmt, k)
        p = -(-n // 16)
        assert packed.dtype == torch.uint8 and packed.shape == (p * 16, weight.shape[1])
        if n % 16 == 0:                                     # compact: the same bytes (4-bit: nibbles), reordered
            assert packed.shape == weight.shape

            def units(t):
                t = t.reshape(-1)
                return t if fmt == "Q8_0" else torch.cat([t & 15, t >> 4])
            assert torch.equal(units(packed).sort().values, units(weight).sort().values)
        assert torch.equal(quant_panels.unpack(packed, fmt, n, k), weight)


def _scalar(x, packed, fmt, n, k, bias):
    return quant_panels._linear(x, packed, fmt, n, k, bias, scalar=True)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_matches_reference_and_is_bitwise_stable(fmt, restore_threads):
    gen = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        weight, deq = _case(fmt, n, k, seed=n * k)
        packed = quant_panels.repack(weight, fmt, k)
        x = torch.randn(37, k, generator=gen) * 2
        for bias in (None, torch.randn(n, generator=gen)):
            torch.set_num_threads(2)
            full = quant_panels.linear(x, packed, fmt, n, k, bias)
            assert full.shape == (37, n) and full.dtype == torch.float32
            check_product(full, x, deq, bias)
            assert torch.equal(_scalar(x, packed, fmt, n, k, bias), full)        # the scalar fallback: same bits
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                for m in (1, 2, 3, 4, 5, 8, 9, 17, 37):                        # direct tiles and buffered tiles
                    y = quant_panels.linear(x[:m], packed, fmt, n, k, bias)
                    assert torch.equal(y, full[:m]), (n, k, threads, m)
                for lo, hi in ((1, 3), (5, 6), (7, 19)):                        # rows land in other tile slots
                    assert torch.equal(quant_panels.linear(x[lo:hi], packed, fmt, n, k, bias), full[lo:hi])
            perm = torch.randperm(37, generator=gen)                            # the other rows don't matter
            assert torch.equal(quant_panels.linear(x[perm], packed, fmt, n, k, bias), full[perm])


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_strided_rows_and_batch_shape(fmt):
    n, k = 40, 160
    weight, deq = _case(fmt, n, k, seed=7)
    packed = quant_panels.repack(weight, fmt, k)
    big = torch.randn(12, k + 24)
    x = big[:, 8:8 + k]                                     # row stride k + 24
    assert x.stride(0) == k + 24
    y = quant_panels.linear(x, packed, fmt, n, k)
    assert torch.equal(y, quant_panels.linear(x.contiguous(), packed, fmt, n, k))
    check_product(y, x, deq, None)
    y3 = quant_panels.linear(x.reshape(3, 4, k), packed, fmt, n, k)
    assert y3.shape == (3, 4, n) and torch.equal(y3.reshape(12, n), y)
    assert quant_panels.linear(torch.empty(0, k), packed, fmt, n, k).shape == (0, n)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_row_kernel_within_rounding(fmt):
    """Against quant_linear on the GGUF rows (another summation order): equal within float32 rounding."""
    n, k = 48, 576
    weight, deq = _case(fmt, n, k, seed=3)
    x = torch.randn(5, k)
    a = quant_panels.linear(x, quant_panels.repack(weight, fmt, k), fmt, n, k)
    b = quant_linear.linear(x, weight, fmt, k)
    check_product(a, x, deq, None)
    check_product(b, x, deq, None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_fallback(fmt, monkeypatch):
    n, k = 37, 96
    weight, deq = _case(fmt, n, k, seed=11)
    packed = quant_panels.repack(weight, fmt, k)
    bias = torch.randn(n)
    x = torch.randn(6, k)
    monkeypatch.setattr(native, "available", lambda: False)
    check_product(quant_panels.linear(x, packed, fmt, n, k, bias), x, deq, bias)


def test_bad_packed_shape():
    with pytest.raises(ValueError, match="panels"):
        quant_panels.linear(torch.randn(2, 64), torch.zeros(16, 10, dtype=torch.uint8), "Q8_0", 16, 64)
