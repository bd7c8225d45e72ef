"""float32 linear layers through the C kernel (linear_f32.c), on weights packed into 16-column panels."""
from __future__ import annotations

import torch

from shardserve.kernels.cpu import native


def preferred() -> bool:
    """True when the kernels are built for a CPU with AVX-512 (elsewhere oneDNN's GEMM is the better choice)."""
    return native.available() and bool(native.lib().linear_f32_preferred())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 16), K, 16]: panel p holds output columns 16p .. 16p + 15 (zero past N)."""
    n, k = weight.shape
    panels = -(-n // 16)
    padded = torch.zeros(panels * 16, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(panels, 16, k).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [..., K] float32 -> x W^T (+ bias) [..., n] for W packed by `pack`."""
    k = packed.shape[1]
    rows = _rows(x, k)
    if not native.applies(rows, packed):              # kernels switched off after packing: same product in torch
        out = rows @ packed.transpose(0, 1).reshape(k, -1)[:, :n]
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], n)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.contiguous().data_ptr()
    native.lib().linear_f32(rows.data_ptr(), rows.stride(0), packed.data_ptr(), bias_ptr, out.data_ptr(), n,
                            rows.shape[0], n, k, torch.get_num_threads())
    return out.reshape(*x.shape[:-1], n)


def pack_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """A gate_up weight [2I, K] (gate rows, then up rows; I a multiple of 16) -> panels in (gate, up) pairs:
    panel 2j holds gate columns 16j .. 16j + 15, panel 2j + 1 the same up columns (linear_silu_f32's layout)."""
    two_i, k = weight.shape
    return pack(weight.view(2, two_i // 32, 16, k).transpose(0, 1).reshape(two_i, k))


def gate_up_columns(interleaved: torch.Tensor) -> torch.Tensor:
    """[..., 2I] in pack_gate_up's (gate, up) panel order -> [..., 2I] as gate columns then up columns."""
    lead, two_i = interleaved.shape[:-1], interleaved.shape[-1]
    return interleaved.reshape(*lead, two_i // 32, 2, 16).transpose(-3, -2).reshape(*lead, two_i)


def silu_linear(x: torch.Tensor, packed: torch.Tensor, inter: int) -> torch.Tensor:
    """x [..., K] float32 -> silu(x Wg^T) * (x Wu^T) [..., inter] for a gate_up weight packed by pack_gate_up."""
    k = packed.shape[1]
    rows = _rows(x, k)
    if not native.applies(rows, packed):              # kernels switched off after packing: the same in torch
        gate, up = gate_up_columns(linear(rows, packed, None, 2 * inter)).split(inter, dim=-1)
        return (torch.nn.functional.silu(gate) * up).reshape(*x.shape[:-1], inter)
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype)
    native.lib().linear_silu_f32(rows.data_ptr(), rows.stride(0), packed.data_ptr(), out.data_ptr(), inter,
                                 rows.shape[0], inter, k, torch.get_num_threads())
    return out.reshape(*x.shape[:-1], inter)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as [M, K] with unit column stride (a view when it already has one)."""
    rows = x.reshape(-1, k)
    return rows if rows.stride(1) == 1 else rows.contiguous()
