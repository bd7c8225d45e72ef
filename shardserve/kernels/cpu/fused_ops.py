"""Fused element-wise ops (fused_ops.c) for float32 on the CPU (bfloat16 KV caches too); each returns None (or False)
when it does not apply.

Callers keep their torch expression as the fallback (CUDA, other dtypes, no C compiler), and the tests check
both give the same values.
"""
from __future__ import annotations

import torch

from shardserve.kernels.cpu import native


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """x, residual [T, H] -> (weight * norm(x + residual), x + residual), or (weight * norm(x), None)."""
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if x.dim() != 2 or not native.applies(*tensors):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    if residual is None:
        residual_in = residual_out = None
    else:
        residual_in, residual_out = residual.contiguous(), torch.empty_like(x)
    native.lib().rms_norm_f32(x.data_ptr(), _ptr(residual_in), weight.data_ptr(), out.data_ptr(),
                              _ptr(residual_out), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out, residual_out


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x [T, H, D] (heads contiguous within a row, any row stride) rotated at positions [T] -> [T, H, D]."""
    t, h, d = x.shape
    if (not native.applies(x, cos, sin) or x.stride(2) != 1 or x.stride(1) != d or positions.dtype != torch.int64
            or not cos.is_contiguous() or not sin.is_contiguous()):
        return None
    positions = positions.contiguous()
    out = torch.empty(t, h, d, dtype=x.dtype)
    native.lib().rotary_f32(x.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                            t, h, d, x.stride(0), torch.get_num_threads())
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """gate_up [T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I]."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or not native.applies(gate_up):
        return None
    t, width = gate_up.shape
    out = torch.empty(t, width // 2, dtype=gate_up.dtype)
    native.lib().silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), t, width // 2, gate_up.stride(0),
                              torch.get_num_threads())
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor) -> bool:
    """k_cache[slots] = k, v_cache[slots] = v (k/v [T, Hk, hd] float32, any row stride; caches float32, or bfloat16
    rounded to nearest even as torch's .to(bfloat16)); False when it does not apply."""
    kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(k_cache.dtype)
    if (kind is None or v_cache.dtype != k_cache.dtype or k_cache.device.type != "cpu" or not native.applies(k, v)
            or slots.dtype != torch.int64 or not slots.is_contiguous()
            or not k_cache.is_contiguous() or not v_cache.is_contiguous() or k.shape != v.shape
            or k.shape[1:] != k_cache.shape[1:] or v_cache.shape != k_cache.shape
            or any(x.stride(2) != 1 or x.stride(1) != x.shape[2] for x in (k, v))):
        return False
    row = k.shape[1] * k.shape[2]
    bad = getattr(native.lib(), f"kv_write_{kind}")(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                                    slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                                    k.shape[0], row, k_cache.shape[0], torch.get_num_threads())
    if bad:
        raise IndexError(f"KV write: {bad} slot(s) outside the cache's {k_cache.shape[0]} slots")
    return True


def round_bf16_(x: torch.Tensor) -> bool:
    """x [T, C] float32 (columns contiguous) rounded in place to the nearest bfloat16 (what the one-call decoder does
    to a bf16 model's buffers); False when it does not apply."""
    if x.dim() != 2 or x.stride(1) != 1 or not native.applies(x):
        return False
    native.lib().round_bf16_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), torch.get_num_threads())
    return True


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x [T, V] (columns contiguous) -> [T] int64, equal to x.argmax(dim=-1) (first maximum; NaN wins)."""
    if x.dim() != 2 or x.shape[1] == 0 or x.stride(1) != 1 or not native.applies(x):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    native.lib().argmax_rows_f32(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr(),
                                 torch.get_num_threads())
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    """The tensor's data pointer, or None (a C NULL) for no tensor."""
    return None if t is None else t.data_ptr()
