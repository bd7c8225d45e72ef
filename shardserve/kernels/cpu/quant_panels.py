"""Linear layers on GGUF Q8_0 / Q4_0 / Q4_1 weights repacked once at load into k-major panels of 16 output rows
(quant_panels.c): the same bytes as the GGUF rows, laid out so that the kernel decodes one k of 16 outputs with one
load, and computes every output as one float32 FMA chain over ascending k (as linear_f32.c does), so a result is
bitwise the same for any M, thread count or neighbouring rows. Without the C kernels: torch dequantization."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shardserve.kernels.cpu import native, quant_linear

FORMATS = ("Q8_0", "Q4_0", "Q4_1")
PANEL = 16


def supports(fmt: str) -> bool:
    """True for the formats this layout takes (the rest stay on quant_linear's row layout)."""
    return fmt in FORMATS


def _check(fmt: str, k: int) -> tuple[int, int]:
    if not supports(fmt):
        raise ValueError(f"quant_panels: unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}")
    elems, nbytes = quant_linear.FORMATS[fmt]
    quant_linear.row_bytes(fmt, k)                     # checks K
    return elems, nbytes


def repack(weight: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    """GGUF rows uint8 [N, row_bytes] -> uint8 [ceil(N / 16) * 16, row_bytes] in the panel layout (see
    quant_panels.c; rows past N are zero and decode to zero weights). Runs once at load."""
    _, bpb = _check(fmt, k)
    w = quant_linear._weight(weight, fmt, k, None)
    n, rb = w.shape
    nb = k // 32
    p = -(-n // PANEL)
    rows = np.zeros((p * PANEL, rb), dtype=np.uint8)
    rows[:n] = w.cpu().numpy()
    blocks = rows.reshape(p, PANEL, nb, bpb).transpose(0, 2, 1, 3)           # [P, nb, 16 rows, bpb]
    hdr = 4 if fmt == "Q4_1" else 2
    head = blocks[..., :hdr].reshape(p, nb, PANEL, hdr // 2, 2).transpose(0, 1, 3, 2, 4).reshape(p, nb, -1)
    qs = blocks[..., hdr:]                                                     # [P, nb, 16, 32 or 16]
    if fmt == "Q8_0":
        vals = qs.transpose(0, 1, 3, 2)                                        # [P, nb, k, 16 rows]
    else:
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)                      # [P, nb, 16, 32]: q[k]
        pairs = q[..., 0::2] | (q[..., 1::2] << 4)                             # byte j: q[2j] | q[2j+1] << 4
        vals = pairs.transpose(0, 1, 3, 2)                                     # [P, nb, 16 pairs, 16 rows]
    out = np.concatenate([head, vals.reshape(p, nb, -1)], axis=-1)           # [P, nb, 16 * bpb]
    return torch.from_numpy(np.ascontiguousarray(out).reshape(p * PANEL, rb))


def unpack(packed: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """The inverse of `repack`: GGUF rows uint8 [n, row_bytes]."""
    _, bpb = _check(fmt, k)
    nb = k // 32
    p = -(-n // PANEL)
    a = packed.cpu().numpy().reshape(p, nb, PANEL * bpb)
    hdr = 4 if fmt == "Q4_1" else 2
    head = a[..., :PANEL * hdr].reshape(p, nb, hdr // 2, PANEL, 2).transpose(0, 1, 3, 2, 4).reshape(p, nb, PANEL, hdr)
    if fmt == "Q8_0":
        qs = a[..., PANEL * hdr:].reshape(p, nb, 32, PANEL).transpose(0, 1, 3, 2)
    else:
        pairs = a[..., PANEL * hdr:].reshape(p, nb, 16, PANEL).transpose(0, 1, 3, 2)   # [P, nb, 16 rows, 16]
        q = np.empty(pairs.shape[:-1] + (32,), dtype=np.uint8)
        q[..., 0::2], q[..., 1::2] = pairs & 0x0F, pairs >> 4
        qs = q[..., :16] | (q[..., 16:] << 4)
    blocks = np.concatenate([head, qs], axis=-1).transpose(0, 2, 1, 3)        # [P, 16, nb, bpb]
    return torch.from_numpy(np.ascontiguousarray(blocks).reshape(p * PANEL, nb * bpb)[:n].copy())


def linear(x: torch.Tensor, packed: torch.Tensor, fmt: str, n: int, k: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float32 -> x W^T (+ bias) [..., n] for W repacked by `repack`."""
    return _linear(x, packed, fmt, n, k, bias, scalar=False)


_SHAPES: dict[tuple[str, int, int], tuple[int, int]] = {}      # (fmt, n, k) -> (packed bytes, format code)


def _shape(fmt: str, n: int, k: int) -> tuple[int, int]:
    key = (fmt, n, k)
    got = _SHAPES.get(key)
    if got is None:
        _, bpb = _check(fmt, k)
        got = _SHAPES[key] = (-(-n // PANEL) * PANEL * (k // 32) * bpb, quant_linear.format_code(fmt))
    return got


def _linear(x, packed, fmt, n, k, bias, scalar: bool) -> torch.Tensor:
    nbytes, code = _shape(fmt, n, k)
    if packed.dtype != torch.uint8 or packed.numel() != nbytes or not packed.is_contiguous():
        raise ValueError(f"{fmt} panels for N={n}, K={k}: expected {nbytes} contiguous uint8 bytes "
                         f"({-(-n // PANEL) * PANEL} rows), got {packed.dtype} {list(packed.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight K={k}")
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    if rows.stride(1) != 1 or rows.dtype != torch.float32:
        rows = rows.contiguous().float()
    if bias is not None:
        bias = bias.float().contiguous()
    if not native.available():
        w = quant_linear.dequantize(unpack(packed, fmt, n, k), fmt, k)
        return F.linear(rows, w, bias).reshape(*x.shape[:-1], n)
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        lib = native.lib()
        fn = lib.quant_panels_linear_scalar_f32 if scalar else lib.quant_panels_linear_f32
        rc = fn(rows.data_ptr(), rows.stride(0), packed.data_ptr(), None if bias is None else bias.data_ptr(),
                out.data_ptr(), n, m, n, k, code, torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"quant_panels_linear_f32 ({fmt}, M={m}, K={k}): rc={rc}")
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)
