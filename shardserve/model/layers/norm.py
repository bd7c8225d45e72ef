"""RMSNorm with an optional fused residual add (computed in float32, as transformers does)."""
from __future__ import annotations

import torch
from torch import nn

from shardserve.kernels.cpu import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x) or, with a residual, (norm(x + residual), x + residual)."""
        fused = fused_ops.rms_norm(x, residual, self.weight, self.eps)
        if fused is not None:
            return fused[0] if residual is None else fused
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
