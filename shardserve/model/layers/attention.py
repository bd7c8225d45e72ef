"""Paged attention on this rank's heads: write K/V into the block cache, attend over each context."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.model.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Bound by the model runner: each [num_slots, num_kv_heads, head_dim] (num_slots = blocks * block_size).
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [T, Hq, hd], k/v [T, Hk, hd] -> [T, Hq * hd]."""
        self.k_cache.index_copy_(0, batch.slot_mapping, k)
        self.v_cache.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)
        b = batch.num_decode
        if b:
            keys = self.k_cache[batch.decode_slots].transpose(1, 2)            # [B, Hk, L, hd]
            values = self.v_cache[batch.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:b].unsqueeze(2), keys, values, attn_mask=batch.decode_mask,
                                               scale=self.scale, enable_gqa=True)    # [B, Hq, 1, hd]
            out[:b] = o.squeeze(2)
        for seg in batch.prefills:
            rows = slice(seg.start, seg.start + seg.length)
            qs = q[rows].transpose(0, 1)                                            # [Hq, n, hd]
            if seg.context_slots is None:
                ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)          # [Hk, n, hd]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                ks = self.k_cache[seg.context_slots].transpose(0, 1)                # [Hk, ctx, hd]
                vs = self.v_cache[seg.context_slots].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, scale=self.scale,
                                                   enable_gqa=True)
            out[rows] = o.transpose(0, 1)
        return out.reshape(q.shape[0], -1)
