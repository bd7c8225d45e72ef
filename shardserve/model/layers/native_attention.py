"""Paged decode attention through the C kernel (paged_decode.c): reads K/V in place from the block cache."""
from __future__ import annotations

import torch

from shardserve.model.layers import native


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, hd] float32 CPU; caches [S, Hk, hd]; slots [B, L] and lens [B] int64 -> [B, Hq, hd]
    (written into `out` when given: contiguous, q's shape)."""
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and slots.dtype == lens.dtype == torch.int64
    q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    bsz, hq, hd = q.shape
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    native.lib().paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                                  lens.data_ptr(), out.data_ptr(), bsz, hq, k_cache.shape[1], hd, slots.shape[1],
                                  scale, torch.get_num_threads())
    return out
