"""bfloat16 linear layers through the C kernel (linear_bf16.c, VDPBF16PS) on weights packed into k-pair panels."""
from __future__ import annotations

import torch

from shardserve.kernels.cpu import native

PANEL = 16


def supported() -> bool:
    """True when the kernels are built for a CPU with AVX512-BF16 (elsewhere bf16 linears take oneDNN)."""
    return native.available() and bool(native.lib().linear_bf16_supported())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [ceil(N / 16), ceil(K / 2), 16, 2]: panel p, pair j holds (w[n, 2j], w[n, 2j + 1]) for the
    panel's 16 rows n (zero past N and K)."""
    n, k = weight.shape
    panels, pairs = -(-n // PANEL), -(-k // 2)
    padded = torch.zeros(panels * PANEL, pairs * 2, dtype=torch.bfloat16)
    padded[:n, :k] = weight
    return padded.view(panels, PANEL, pairs, 2).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack`: bf16 [n, k]."""
    panels, pairs = packed.shape[:2]
    return packed.transpose(1, 2).reshape(panels * PANEL, pairs * 2)[:n, :k]


def rows(packed: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `ids` [T] of the weight packed by `pack`, as bf16 [T, k] (a tied embedding's lookups)."""
    picked = packed[ids // PANEL, :, ids % PANEL, :]              # [T, K2, 2]: each pair of row n in order
    return picked.reshape(ids.shape[0], -1)[:, :k]


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """x [..., K] (rounded to bf16) -> x W^T (+ bias) [..., n] in float32 for W packed by `pack`."""
    if packed.dtype != torch.bfloat16 or packed.shape != (-(-n // PANEL), -(-k // 2), PANEL, 2):
        raise ValueError(f"bf16 panels for N={n}, K={k}: got {packed.dtype} {list(packed.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight K={k}")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1 or rows.dtype != torch.float32:
        rows = rows.contiguous().float()
    if bias is not None:
        bias = bias.float().contiguous()
    if not supported():                              # kernels switched off after packing: the same product in torch
        out = rows.bfloat16().float() @ unpack(packed, n, k).float().t()
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], n)
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0] and n:
        rc = native.lib().linear_bf16(rows.data_ptr(), rows.stride(0), packed.data_ptr(),
                                      None if bias is None else bias.data_ptr(), out.data_ptr(), n, rows.shape[0], n,
                                      k, torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"linear_bf16 (M={rows.shape[0]}, K={k}): rc={rc}")
    return out.reshape(*x.shape[:-1], n)
