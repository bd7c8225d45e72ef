"""The quantized linear kernels (quant_linear.c) against float64 products of gguf's dequantized weights: every
format, odd shapes, threads, strided x, weight row slices, K split at block boundaries, and the torch fallback.
The activations stay float32, so the only error allowed is float32 summation rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import kquants
from product_bound import EPS32, check_product
from shardserve.kernels.cpu import native, quant_linear

needs_kernels = pytest.mark.skipif(not native.available(), reason="the C kernels are not built here (no gcc)")
FORMATS = list(quant_linear.FORMATS)
KS = {"Q8_0": (32, 96, 576), "Q4_0": (32, 96, 576), "Q4_1": (32, 160, 576), "Q4_K": (256, 768),
      "Q5_K": (256, 768), "Q6_K": (256, 768), "I8": (7, 64, 100, 601)}



@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _quantize(fmt: str, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """float [N, K] -> (weight, scales, the dequantized weight in float64 by the reference)."""
    if fmt == "I8":
        q, scales = quant_linear.quantize_int8(torch.from_numpy(w))
        return q, scales, q.double().numpy() * scales.double().numpy()[:, None]
    qtype = GGMLQuantizationType[fmt]
    blocks = kquants.quantize_k(w, fmt) if fmt.endswith("_K") else gguf_quantize(w, qtype)
    return torch.from_numpy(blocks), None, gguf_dequantize(blocks, qtype).astype(np.float64)


def _case(fmt: str, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    weight, scales, deq = _quantize(fmt, (rng.standard_normal((n, k)) * 0.1).astype(np.float32))
    return weight, scales, deq


def test_row_bytes():
    assert quant_linear.row_bytes("Q8_0", 576) == 18 * 34
    assert quant_linear.row_bytes("Q4_K", 512) == 288
    assert quant_linear.row_bytes("I8", 7) == 7
    with pytest.raises(ValueError, match="Q6_K.*K=576"):
        quant_linear.row_bytes("Q6_K", 576)
    with pytest.raises(ValueError, match="Q2_K"):
        quant_linear.row_bytes("Q2_K", 256)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf(fmt):
    for k in KS[fmt]:
        weight, scales, deq = _case(fmt, 37, k, seed=k)
        out = quant_linear.dequantize(weight, fmt, k, scales)
        assert out.dtype == torch.float32 and out.shape == (37, k)
        np.testing.assert_array_equal(out.numpy(), deq.astype(np.float32))
        ids = torch.tensor([36, 0, 5, 5, 17])
        rows = quant_linear.dequantize_rows(weight, fmt, k, ids, scales)
        np.testing.assert_array_equal(rows.numpy(), deq[ids.numpy()].astype(np.float32))


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_matches_reference(fmt, restore_threads):
    torch.set_num_threads(2)
    for i, k in enumerate(KS[fmt]):
        for n in (1, 37, 100):
            weight, scales, deq = _case(fmt, n, k, seed=n * 1000 + k)
            gen = torch.Generator().manual_seed(n + k)
            x = torch.randn(64, k, generator=gen) * torch.rand(64, 1, generator=gen) * 3
            x[5, : min(k, 32)] = 0.0                      # an all-zero activation block
            bias = torch.randn(n, generator=gen) if (n + i) % 2 else None
            full = quant_linear.linear(x, weight, fmt, k, bias=bias, scales=scales)
            assert full.shape == (64, n) and full.dtype == torch.float32
            check_product(full, x, deq, bias)
            for m in (1, 3, 17):                          # a row's result does not depend on the batch
                start = (7 * m) % (64 - m)
                part = quant_linear.linear(x[start:start + m], weight, fmt, k, bias=bias, scales=scales)
                assert torch.equal(part, full[start:start + m]), (k, n, m)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_threads_bitwise(fmt, restore_threads):
    k = KS[fmt][-1]
    weight, scales, _ = _case(fmt, 100, k, seed=3)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(1))
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(quant_linear.linear(x, weight, fmt, k, scales=scales))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_strided_x_and_weight_rows(fmt):
    k = KS[fmt][-1]
    weight, scales, deq = _case(fmt, 100, k, seed=4)
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 9, k + 13, generator=gen)
    x = wide[..., 5:5 + k]                                # strided rows, leading dims kept
    bias = torch.randn(100, generator=gen)
    out = quant_linear.linear(x, weight, fmt, k, bias=bias, scales=scales)
    assert out.shape == (2, 9, 100)
    assert torch.equal(out, quant_linear.linear(x.contiguous(), weight, fmt, k, bias=bias, scales=scales))
    check_product(out.reshape(18, 100), x.reshape(18, k), deq, bias)
    sub_scales = None if scales is None else scales[10:47]
    rows = quant_linear.linear(x, weight[10:47], fmt, k, bias=bias[10:47], scales=sub_scales)
    assert torch.equal(rows, out[..., 10:47])


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_at_blocks(fmt):
    k = {"I8": 100}.get(fmt, KS[fmt][-1])
    weight, scales, deq = _case(fmt, 37, k, seed=5)
    elems, nbytes = quant_linear.FORMATS[fmt]
    cut = 37 if fmt == "I8" else (k // elems // 2) * elems
    cut_bytes = cut // elems * nbytes
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6))
    whole = quant_linear.linear(x, weight, fmt, k, scales=scales)
    halves = (quant_linear.linear(x[:, :cut], weight[:, :cut_bytes], fmt, cut, scales=scales)
              + quant_linear.linear(x[:, cut:], weight[:, cut_bytes:], fmt, k - cut, scales=scales))
    check_product(whole, x, deq, None)
    check_product(halves, x, deq, None, c=12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_fallback(fmt, monkeypatch):
    k = KS[fmt][-1]
    weight, scales, deq = _case(fmt, 37, k, seed=7)
    gen = torch.Generator().manual_seed(8)
    x, bias = torch.randn(5, k, generator=gen), torch.randn(37, generator=gen)
    kernel = quant_linear.linear(x, weight, fmt, k, bias=bias, scales=scales) if native.available() else None
    monkeypatch.setattr(native, "available", lambda: False)
    out = quant_linear.linear(x, weight, fmt, k, bias=bias, scales=scales)
    ref = x.double().numpy() @ deq.T + bias.double().numpy()
    tol = 4 * k * EPS32 * (np.abs(x.double().numpy()) @ np.abs(deq).T + np.abs(bias.double().numpy()))
    np.testing.assert_array_less(np.abs(out.double().numpy() - ref), tol + 1e-7)
    if kernel is not None:                                 # both are float32 products of the same weights
        check_product(kernel, x, deq, bias)


def test_quantize_int8_round_trip():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(33, 70, generator=gen) * torch.rand(33, 1, generator=gen)
    w[3] = 0.0
    for src in (w, w.bfloat16()):
        q, scales = quant_linear.quantize_int8(src)
        ref = src.float()
        assert q.dtype == torch.int8 and q.shape == (33, 70) and scales.dtype == torch.float32
        torch.testing.assert_close(scales, ref.abs().amax(dim=1) / 127)
        assert q.abs().max() <= 127 and torch.all(q[3] == 0) and scales[3] == 0
        err = (q.float() * scales[:, None] - ref).abs()
        assert torch.all(err <= scales[:, None] * 0.5 * (1 + 1e-5) + 1e-12)
        assert torch.equal(quant_linear.dequantize(q, "I8", 70, scales), q.float() * scales[:, None])
