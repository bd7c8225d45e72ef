"""Paged attention on this rank's heads: write K/V into the block cache, attend over each context."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model.forward_batch import ForwardBatch, PrefillSegment
from shardserve.kernels.cpu import fused_ops, native, native_attention

_STACKED_MAX_SCORES = 512 * 512      # query x key pairs per head up to which CPU prefill uses stacked bmm


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Bound by the model runner (bind_cache): each [num_slots, num_kv_heads, head_dim], num_slots = blocks * block_size.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.native_decode = self.native_prefill = False

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Attend over these caches. The C kernels are chosen here, once: decode (and the KV write) for float32
        CPU caches, prefill when also head_dim is a multiple of 16 and a kv head serves at most 64 query heads."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.native_decode = native.applies(k_cache, v_cache)
        self.native_prefill = self.native_decode and native_attention.prefill_supports(
            self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, Hq, hd], k/v [T, Hk, hd] -> [T, Hq * hd]."""
        if not (self.native_decode and fused_ops.write_kv(k, v, batch.slot_mapping, self.k_cache, self.v_cache)):
            self.k_cache.index_copy_(0, batch.slot_mapping, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(0, batch.slot_mapping, v.to(self.v_cache.dtype))
        out = torch.empty_like(q)
        if batch.num_decode:
            self._decode(q[: batch.num_decode], batch, out[: batch.num_decode])
        if batch.prefills and self.native_prefill:
            native_attention.prefill(q, self.k_cache, self.v_cache, batch.prefill_plan, self.scale, out)
            return out.reshape(q.shape[0], -1)
        for seg in batch.prefills:
            rows = slice(seg.start, seg.start + seg.length)
            if seg.context_slots is None:
                ks, vs = k[rows], v[rows]                                           # [n, Hk, hd]
            else:
                ks, vs = self.k_cache[seg.context_slots], self.v_cache[seg.context_slots]   # [ctx, Hk, hd]
            out[rows] = self._prefill(q[rows], ks, vs, seg)
        return out.reshape(q.shape[0], -1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: PrefillSegment) -> torch.Tensor:
        """One chunk's queries over its context: q [n, Hq, hd], k/v [ctx, Hk, hd] -> [n, Hq, hd].

        On the CPU in float32, for chunks up to 512 x 512, two batched matmuls per kv head with the group's
        query heads stacked as rows (no K/V repeat): ~1.6x faster than SDPA here (128 tokens: 392 vs 634 us,
        benchmarks/kernel_timings.py).
        Longer chunks and other devices take SDPA, which never holds the whole [Hq, n, ctx] score matrix.
        """
        n, ctx = seg.length, seg.context_len
        hk, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        if q.device.type == "cpu" and q.dtype == torch.float32 and n * ctx <= _STACKED_MAX_SCORES:
            qg = q.view(n, hk, group, hd).permute(1, 2, 0, 3).reshape(hk, group * n, hd)      # [Hk, G*n, hd]
            bias = seg.bias.expand(hk, group, n, ctx).reshape(hk, group * n, ctx)
            scores = torch.baddbmm(bias, qg, k.permute(1, 2, 0), alpha=self.scale)          # [Hk, G*n, ctx]
            o = torch.bmm(scores.softmax(-1), v.transpose(0, 1))                            # [Hk, G*n, hd]
            return o.view(hk, group, n, hd).permute(2, 0, 1, 3).reshape(n, self.num_heads, hd)
        qs, ks, vs = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if seg.context_slots is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.bias.to(q.dtype), scale=self.scale,
                                               enable_gqa=True)
        return o.transpose(0, 1)

    def _decode(self, q: torch.Tensor, batch: ForwardBatch, out: torch.Tensor) -> None:
        """One query per sequence over its gathered context, GQA without repeating K/V.

        q [B, Hq, hd] -> out [B, Hq, hd]. On the CPU in float32 the C kernel reads K/V in place from the blocks
        (native_attention). Otherwise batched matmuls over (sequence, kv head), which beat SDPA's masked math
        path here by ~3x: the gather is one index_select per cache, the rest is two small bmm calls.
        """
        if self.native_decode:
            native_attention.paged_decode(q, self.k_cache, self.v_cache, batch.decode_slots, batch.decode_lens,
                                          self.scale, out)
            return
        bsz, width = batch.decode_slots.shape
        hk, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        flat = batch.decode_slots.view(-1)

        def gather(cache: torch.Tensor) -> torch.Tensor:      # -> [B * Hk, L, hd]
            return cache.index_select(0, flat).view(bsz, width, hk, hd).transpose(1, 2).reshape(bsz * hk, width, hd)

        keys, values = gather(self.k_cache).float(), gather(self.v_cache).float()    # float32 math for any cache
        scores = torch.baddbmm(batch.decode_bias.expand(bsz, hk, group, width).reshape(bsz * hk, group, width),
                               q.reshape(bsz * hk, group, hd).float(), keys.transpose(1, 2), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1)                                # [B * Hk, G, L]
        out.view(bsz * hk, group, hd).copy_(torch.bmm(probs, values))
