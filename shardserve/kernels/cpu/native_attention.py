"""Paged attention through the C kernels (paged_decode.c, prefill_attention.c): K/V read in place from the block cache
(float32 or bfloat16; queries and outputs float32)."""
from __future__ import annotations

import torch

from shardserve.kernels.cpu import native


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, hd] float32 CPU; caches [S, Hk, hd] float32 or bfloat16; slots [B, L] and lens [B] int64 ->
    [B, Hq, hd] (written into `out` when given: contiguous, q's shape)."""
    assert q.dtype == torch.float32 and slots.dtype == lens.dtype == torch.int64
    q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    bsz, hq, hd = q.shape
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    _kernel("paged_decode", k_cache, v_cache)(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                                              lens.data_ptr(), out.data_ptr(), bsz, hq, k_cache.shape[1], hd,
                                              slots.shape[1], scale, torch.get_num_threads())
    return out


def prefill_supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The prefill kernel takes head_dim a multiple of 16 and up to 64 query heads per kv head (float32 CPU tensors,
    heads contiguous within a row)."""
    return head_dim % 16 == 0 and num_heads // num_kv_heads <= 64


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor],
            scale: float, out: torch.Tensor) -> None:
    """Every prefill chunk of the step (ForwardBatch.prefill_plan) attends causally over its context, whose K/V
    are already in the caches [S, Hk, hd] (float32 or bfloat16); writes the chunks' rows of out [T, Hq, hd]
    (float32, contiguous)."""
    segs, slots = plan
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous() and out.shape == q.shape
    assert segs.dtype == slots.dtype == torch.int64 and segs.is_contiguous() and slots.is_contiguous()
    _, hq, hd = q.shape
    if q.stride(2) != 1 or q.stride(1) != hd:                  # rows of q may be strided, heads must be packed
        q = q.contiguous()
    _kernel("prefill_attention", k_cache, v_cache)(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                                   segs.data_ptr(), segs.shape[0], slots.data_ptr(), out.data_ptr(),
                                                   hq, k_cache.shape[1], hd, scale, torch.get_num_threads())


def _kernel(name: str, k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The C function `name` for the caches' dtype (float32 or bfloat16, both the same)."""
    suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(k_cache.dtype)
    assert suffix is not None and v_cache.dtype == k_cache.dtype, (k_cache.dtype, v_cache.dtype)
    return getattr(native.lib(), f"{name}_{suffix}")
