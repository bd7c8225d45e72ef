"""Exact greedy argmax of a float32 LM head through a bfloat16 screen (greedy_head.c) on AVX512-BF16 CPUs."""
from __future__ import annotations

import math

import torch

from shardserve.kernels.cpu import native


def supported() -> bool:
    """True when the kernels are built for a CPU with AVX512-BF16 (VDPBF16PS)."""
    return native.available() and bool(native.lib().greedy_head_supported())


def applies(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """True when the screen can take this call: float32 CPU tensors and the kernels on (not switched off since)."""
    return native.applies(x, packed) and x.dim() == 2


def bound_factor(k: int) -> float:
    """c with |bf16 screen logit - float32 logit| <= c * ||x|| * ||w_v||: rounding x and w_v to bf16 (2u + u^2 with
    u = 2^-8), both float32 sums of k terms (gamma_k each, one over bf16 values up to (1 + u)^2 larger), times
    1.01 for the norms' and the comparisons' own float32 rounding."""
    u, gamma = 2.0 ** -8, k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    return 1.01 * (2 * u + u * u + gamma * (1 + u) ** 2 + gamma)


class GreedyScreen:
    """Built from linear_f32's panels [P, K, 16] of an LM head shard whose first n_valid columns are real vocab
    rows; argmax(x) gives each row's first maximal logit and its value, equal to argmax over x W^T in float32."""

    def __init__(self, packed: torch.Tensor, n_valid: int):
        panels, k, _ = packed.shape
        k2 = (k + 1) // 2
        self.packed, self.n_valid, self.k = packed, n_valid, k
        pairs = torch.zeros(panels, 2 * k2, 16, dtype=torch.bfloat16)
        pairs[:, :k] = packed
        # [P, K2, 16, 2] bf16: column j's (k = 2i, 2i + 1) pair adjacent, as VDPBF16PS multiplies them
        self.weight_bf16 = pairs.view(panels, k2, 2, 16).transpose(2, 3).contiguous()
        norms = torch.linalg.vector_norm(packed, dim=1).reshape(-1).double()      # ||w_v|| per column [P * 16]
        scaled = (norms * bound_factor(k) * (1 + 2.0 ** -20)).float()
        self.col_bound = torch.nextafter(scaled, torch.tensor(math.inf)) + 2.0 ** -50
        self._scratch: dict[str, torch.Tensor] = {}
        self.full_rows = 0          # rows of the last call that had a non-finite value: every logit in float32

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor kept between calls (a fresh 12 MB buffer per step would fault its pages in each time)."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[name] = torch.empty(numel, dtype=dtype)
        return buf

    def argmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] float32 -> (values [M] float32, indices [M] int64) of the first maximum of each row of x W^T
        over the valid columns (NaN counts as the maximum, as in torch.argmax)."""
        x = x if x.stride(-1) == 1 else x.contiguous()
        m, threads = x.shape[0], torch.get_num_threads()
        panels = self.packed.shape[0]
        chunk = min(m, 64)                                                   # greedy_head.c's MC
        values, indices = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.int64)
        self.full_rows = native.lib().greedy_head_f32(
            x.data_ptr(), x.stride(0), m, self.k, self.weight_bf16.data_ptr(), self.packed.data_ptr(),
            self.col_bound.data_ptr(), self.n_valid, panels,
            self._buffer("xb", m * ((self.k + 1) // 2), torch.int32).data_ptr(),
            self._buffer("norms", m, torch.float32).data_ptr(),
            self._buffer("upper", chunk * panels, torch.float32).data_ptr(),
            self._buffer("lower", threads * 64, torch.float32).data_ptr(),
            self._buffer("row", threads * panels * 16, torch.float32).data_ptr(),
            self._buffer("bad", m, torch.uint8).data_ptr(),
            values.data_ptr(), indices.data_ptr(), threads)
        return values, indices
