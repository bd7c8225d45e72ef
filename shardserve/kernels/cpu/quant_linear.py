"""Linear layers on quantized weights (GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K blocks, or int8 with per-row
scales) through the C kernel (quant_linear.c), which decodes the weights to float32 in registers and keeps the
activations in float32; torch dequantization otherwise (the same values up to float32 summation order)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardserve.kernels.cpu import native

FORMATS: dict[str, tuple[int, int]] = {       # name -> (elements per block, bytes per block)
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "I8": (1, 1),
}
_CODES = {name: i for i, name in enumerate(FORMATS)}      # quant_linear.c's fmt numbers, in the same order


def format_code(fmt: str) -> int:
    """quant_linear.c's number for a format (decoder_f32.c takes it per linear)."""
    _format(fmt)
    return _CODES[fmt]


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one weight row of K elements in `fmt`."""
    elems, nbytes = _format(fmt)
    if k <= 0 or k % elems:
        raise ValueError(f"{fmt}: K={k} is not a positive multiple of the {elems}-element block")
    return k // elems * nbytes


def linear(x: torch.Tensor, weight: torch.Tensor, fmt: str, k: int, bias: torch.Tensor | None = None,
           scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float32 -> x W^T (+ bias) [..., N] float32 for W [N, row_bytes] in `fmt` (scales [N] for I8).

    The C kernel computes x @ dequantize(W)^T in float32 (exact dequantized weights, float32 FMAs in a fixed
    order per output), so a row's result does not depend on the other rows, M or the thread count."""
    w = _weight(weight, fmt, k, scales)
    n = w.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1 or rows.dtype != torch.float32:
        rows = rows.contiguous().float()
    if bias is not None:
        bias = bias.float().contiguous()
    if not native.available():
        # No C kernels: dequantize and multiply in float32 (the kernel's values up to summation order).
        return F.linear(rows, dequantize(w, fmt, k, scales), bias).reshape(*x.shape[:-1], n)
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0] == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    scale_ptr = None
    if fmt == "I8":
        scales = scales.float().contiguous()
        scale_ptr = scales.data_ptr()
    rc = native.lib().quant_linear_f32(rows.data_ptr(), rows.stride(0), w.data_ptr(), w.stride(0), scale_ptr,
                                       None if bias is None else bias.data_ptr(), out.data_ptr(), n,
                                       rows.shape[0], n, k, _CODES[fmt], torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"quant_linear_f32 ({fmt}, M={rows.shape[0]}, K={k}): no memory for the decode buffer")
    return out.reshape(*x.shape[:-1], n)


def dequantize(weight: torch.Tensor, fmt: str, k: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, row_bytes] in `fmt` -> float32 [N, K], bit-exact with gguf.quants.dequantize."""
    w = _weight(weight, fmt, k, scales)
    if fmt == "I8":
        return w.view(torch.int8).float() * scales.float().reshape(-1, 1)
    elems, nbytes = FORMATS[fmt]
    blocks = w.reshape(-1, nbytes)
    return _DEQUANT[fmt](blocks).reshape(w.shape[0], k)


def dequantize_rows(weight: torch.Tensor, fmt: str, k: int, ids: torch.Tensor,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` of W dequantized: [len(ids), K] float32 (an embedding lookup from a quantized table)."""
    ids = ids.reshape(-1).long()
    w = _weight(weight, fmt, k, scales)
    if ids.numel() and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IndexError(f"dequantize_rows: ids outside [0, {w.shape[0]})")
    if not native.available():
        return dequantize(w.index_select(0, ids), fmt, k, None if scales is None else scales.reshape(-1)[ids])
    ids = ids.contiguous()
    out = torch.empty(ids.numel(), k, dtype=torch.float32)
    scale_ptr = None
    if fmt == "I8":
        scales = scales.float().contiguous()
        scale_ptr = scales.data_ptr()
    native.lib().quant_dequant_rows_f32(w.data_ptr(), w.stride(0), scale_ptr, ids.data_ptr(), ids.numel(),
                                        out.data_ptr(), k, _CODES[fmt], torch.get_num_threads())
    return out


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 / bf16 [N, K] -> (int8 [N, K], float32 scales [N]): symmetric per-row absmax / 127, round to nearest."""
    w = w.float()
    scales = w.abs().amax(dim=1) / 127.0
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(w * inv.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def _format(fmt: str) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _weight(weight: torch.Tensor, fmt: str, k: int, scales: torch.Tensor | None) -> torch.Tensor:
    """weight as uint8 [N, row_bytes] with unit column stride (checked against fmt and K)."""
    nbytes = row_bytes(fmt, k)
    if fmt == "I8":
        if scales is None:
            raise ValueError("I8 weights need their per-row scales")
        if weight.dtype == torch.int8:
            weight = weight.view(torch.uint8)
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[1] != nbytes:
        raise ValueError(f"{fmt} weight with K={k}: expected uint8 [N, {nbytes}], got {weight.dtype} "
                         f"{list(weight.shape)}")
    if fmt == "I8" and scales.numel() != weight.shape[0]:
        raise ValueError(f"I8: {scales.numel()} scales for {weight.shape[0]} rows")
    return weight if weight.stride(1) == 1 else weight.contiguous()


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 -> [B, 1] float32 (little-endian fp16)."""
    return b.contiguous().view(torch.float16).float()


def _split_nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[B, n] bytes -> [B, n / group, 2, group]: each group of bytes' low nibbles, then its high nibbles."""
    q = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _split_nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _split_nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 12] packed 6-bit scales / mins -> ([B, 8], [B, 8]) as float32."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    q = _split_nibbles(b[:, 16:], 32).reshape(b.shape[0], 8, 32).float()
    return (d * q - dm).reshape(b.shape[0], 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    ql = _split_nibbles(b[:, 48:], 32).reshape(b.shape[0], 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    qh = (b[:, 16:48].reshape(b.shape[0], 1, 32) >> shifts) & 1
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(b.shape[0], 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = _split_nibbles(b[:, :128], 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, 256)


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
