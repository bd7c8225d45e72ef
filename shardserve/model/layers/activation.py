"""The Llama MLP's activation, silu(gate) * up, on a gate_up output [.., 2I] -> [.., I]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shardserve.kernels.cpu import fused_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The C kernel on float32 CPU rows (fused_ops), the same values through torch elsewhere."""
    act = fused_ops.silu_and_mul(gate_up)
    if act is None:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
    return act
