"""A small numpy quantizer to ggml's Q4_K / Q5_K / Q6_K blocks (gguf-py only dequantizes these), for tests."""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def quantize_k(x: np.ndarray, fmt: str) -> np.ndarray:
    """float [rows, K] (K a multiple of 256) -> uint8 [rows, K / 256 * block_bytes] in ggml's `fmt` layout.

    Plain min/max rounding (no llama.cpp search): each 32-element sub-block (16 for Q6_K) gets its own scale
    (and min), the super-block's fp16 d (and dmin) scale the 6-bit (Q6_K: int8) sub-block scales."""
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"quantize_k: unknown format {fmt!r}")
    x = np.asarray(x, dtype=np.float32)
    rows, k = x.shape
    if k % QK_K:
        raise ValueError(f"quantize_k: K={k} is not a multiple of {QK_K}")
    blocks = x.reshape(-1, QK_K)
    out = _q6_k(blocks) if fmt == "Q6_K" else _q45_k(blocks, 31 if fmt == "Q5_K" else 15)
    return out.reshape(rows, k // QK_K * BLOCK_BYTES[fmt])


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _q45_k(blocks: np.ndarray, qmax: int) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)                     # w = scale * q - min, min >= 0
    scale = (sub.max(axis=-1) - lo) / qmax
    mins = -lo
    d = _f16(scale.max(axis=-1) / 63)
    dmin = _f16(mins.max(axis=-1) / 63)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(mins, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    eff_scale = d.astype(np.float32)[:, None] * sc
    eff_min = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint(_safe_div(sub + eff_min[..., None], eff_scale[..., None])), 0, qmax).astype(np.uint8)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    parts = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed]
    if qmax == 31:
        bits = ((q >> 4) & 1).astype(np.uint8)                 # [n, 8, 32]: bit s of qh[i] is sub-block s's
        qh = np.zeros((n, 32), dtype=np.uint8)
        for s in range(8):
            qh |= bits[:, s] << s
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    idx = np.abs(sub).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(sub, idx, axis=-1)[..., 0]
    scale = -peak / 32                                         # the peak maps to -32 (the wider side)
    amax = np.abs(scale).max(axis=-1)
    d = _f16(amax / 127)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    eff = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_safe_div(sub, eff[..., None])), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    low = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
