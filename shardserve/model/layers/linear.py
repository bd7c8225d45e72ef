"""Tensor-parallel linear layers: each owns its weight shard and the weight_loader that cuts it.

Weights are [out_features_local, in_features_local]. Column-parallel layers split the output (no
communication); row-parallel layers split the input and all-reduce the partial sums. A `loaded` tensor
is a full checkpoint tensor or a LazyTensor (anything with `.narrow(dim, start, length)`), so a rank
reads only its slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.distributed.comm import all_reduce
from shardserve.distributed.parallel_state import ParallelGroup
from shardserve.kernels.cpu import native_linear
from shardserve.model.layers.sharding import HeadShard, shard_range, split_heads


def read_slice(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    return loaded.narrow(dim, start, length)


def read_full(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded.full()


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    copy_into(param, read_full(loaded))


class LinearBase(nn.Module):
    """y = x W^T (+ b). After loading, `prepack()` reorders a CPU weight for a faster GEMM and releases the plain
    copy: float32 into the C kernel's 16-column panels where it is preferred (AVX-512), else oneDNN's layout."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.bias_loader
        else:
            self.bias = None
        self.packed: torch.Tensor | None = None
        self.packed_rows = 0                    # N of the weight packed into panels (0: oneDNN's layout or none)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def bias_loader(self, param, loaded, shard_id=None) -> None:
        self.weight_loader(param, loaded, shard_id)

    def prepack(self) -> None:
        """Reorder the weight for the CPU GEMM (fp32/bf16); the plain copy is released."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or w.numel() == 0:
            return
        if w.dtype == torch.float32 and native_linear.preferred():
            self.packed, self.packed_rows = self.pack_panels(w.data), w.shape[0]
        elif torch.backends.mkldnn.is_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.data, None)
        else:
            return
        self.weight.data = torch.empty(0, dtype=w.dtype)

    def pack_panels(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 weight [N, K] in the panel GEMM's layout (native_linear.pack)."""
        return native_linear.pack(weight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_rows:
            return native_linear.linear(x, self.packed, bias, self.packed_rows)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32):
        super().__init__(in_features, out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output dimension split across the TP group; each rank returns its slice of y (no communication).

    `output_sizes` lists the logical sub-matrices stacked along the output (e.g. [gate, up]); each is split
    on its own so shard i of every sub-matrix lands on rank i. `shards` overrides the (start, size) per
    sub-matrix for this rank.
    """

    def __init__(self, in_features: int, output_sizes: list[int], tp: ParallelGroup, bias: bool = False,
                 dtype=torch.float32, shards: list[tuple[int, int]] | None = None):
        self.tp = tp
        self.shards = shards or [shard_range(n, tp.size, tp.rank_in_group) for n in output_sizes]
        super().__init__(in_features, sum(size for _, size in self.shards), bias, dtype)

    def weight_loader(self, param, loaded, shard_id: int | str | None = None) -> None:
        index = 0 if shard_id is None else self.shard_index(shard_id)
        start, size = self.shards[index]
        offset = sum(s for _, s in self.shards[:index])
        copy_into(param.data.narrow(0, offset, size), read_slice(loaded, 0, start, size))

    def shard_index(self, shard_id: int | str) -> int:
        return int(shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_proj and up_proj in one matmul: local output = [gate shard | up shard]. Where the panel GEMM is
    preferred and the shard is a multiple of 16 wide, the weight is packed in (gate, up) panel pairs so that
    `silu_and_mul` takes silu(gate) * up straight from the GEMM (linear_silu_f32)."""

    gate_up_silu = False

    def pack_panels(self, weight: torch.Tensor) -> torch.Tensor:
        if (weight.shape[0] // 2) % 16 == 0 and len(self.shards) == 2:        # gate and up 16-column aligned
            self.gate_up_silu = True
            return native_linear.pack_gate_up(weight)
        return super().pack_panels(weight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = super().matmul(x, bias)
        return native_linear.gate_up_columns(out) if self.gate_up_silu else out

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up [.., I] from one fused GEMM when the weight is packed for it, else None."""
        if not self.gate_up_silu:
            return None
        return native_linear.silu_linear(x, self.packed, self.packed_rows // 2)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, split by attention heads (whole GQA groups, see split_heads)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: ParallelGroup,
                 bias: bool = False, dtype=torch.float32):
        self.heads: HeadShard = split_heads(num_heads, num_kv_heads, tp.size, tp.rank_in_group)
        h = self.heads
        shards = [(h.q_start * head_dim, h.q_count * head_dim), (h.kv_start * head_dim, h.kv_count * head_dim),
                  (h.kv_start * head_dim, h.kv_count * head_dim)]
        self.head_dim = head_dim
        super().__init__(hidden_size, [], tp, bias, dtype, shards=shards)

    def shard_index(self, shard_id: int | str) -> int:
        return {"q": 0, "k": 1, "v": 2}[shard_id]

    @property
    def output_split(self) -> tuple[int, int, int]:
        return tuple(size for _, size in self.shards)


class RowParallelLinear(LinearBase):
    """Input dimension split across the TP group; partial products are all-reduced (bias added once)."""

    def __init__(self, input_size: int, output_size: int, tp: ParallelGroup, bias: bool = False,
                 dtype=torch.float32, shard: tuple[int, int] | None = None):
        self.tp = tp
        self.shard = shard or shard_range(input_size, tp.size, tp.rank_in_group)
        super().__init__(self.shard[1], output_size, bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        copy_into(param, read_slice(loaded, 1, *self.shard))

    def bias_loader(self, param, loaded, shard_id=None) -> None:
        copy_into(param, read_full(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins the partial sum on tp_rank 0 only, so the all-reduce adds it exactly once.
        bias = self.bias if self.tp.rank_in_group == 0 else None
        return all_reduce(self.matmul(x, bias), self.tp)
