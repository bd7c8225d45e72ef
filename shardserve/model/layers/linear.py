"""Tensor-parallel linear layers: each owns its weight shard and the weight_loader that cuts it.

Weights are [out_features_local, in_features_local]. Column-parallel layers split the output (no
communication); row-parallel layers split the input and all-reduce the partial sums. A `loaded` tensor
is a full checkpoint tensor or a LazyTensor (anything with `.narrow(dim, start, length)`), so a rank
reads only its slice.
"""
from __future__ import annotations

import torch
from torch import nn

from shardserve.distributed.comm import all_reduce
from shardserve.distributed.parallel_state import ParallelGroup
from shardserve.model.layers import formats
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
    """y = x W^T (+ b). The weight's format is a method object (formats.py): the dense one for the dtype and
    device when built, replaced by `use_method` when the loader finds the checkpoint stores another format.
    `process_weights_after_loading()` runs once after the weights are in (packing, quantizing)."""

    gate_up = False                 # MergedColumnParallelLinear: the weight is [gate | up]
    k_slice: tuple[int, int] | None = None      # (start, size) of the input columns this rank holds; None: all

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.packed: torch.Tensor | None = None     # set by methods that reorder the weight
        self.packed_rows = 0                        # N of a weight packed into panels (PanelF32/BF16Method), else 0
        self.use_method(formats.dense_method(dtype, torch.get_default_device(), self.gate_up))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.bias_loader
        else:
            self.bias = None

    def use_method(self, method: formats.LinearMethod) -> None:
        """Store and apply the weight with `method` (before loading: it creates the parameter)."""
        self.method = method
        method.create_weights(self)
        self.weight.weight_loader = self.weight_loader

    @property
    def gate_up_silu(self) -> bool:
        """True when the method fuses silu(gate) * up into the GEMM (gate_up layers packed in panel pairs)."""
        return getattr(self.method, "gate_up_silu", False)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        copy_into(param, self.method.read_full(loaded))

    def bias_loader(self, param, loaded, shard_id=None) -> None:
        copy_into(param, read_full(loaded))

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.method.apply(self, x, bias)


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
        self._load_rows(param, loaded, shard_id, self.method.read)

    def bias_loader(self, param, loaded, shard_id: int | str | None = None) -> None:
        self._load_rows(param, loaded, shard_id, read_slice)

    def _load_rows(self, param, loaded, shard_id, read) -> None:
        index = 0 if shard_id is None else self.shard_index(shard_id)
        start, size = self.shards[index]
        offset = sum(s for _, s in self.shards[:index])
        copy_into(param.data.narrow(0, offset, size), read(loaded, 0, start, size))

    def shard_index(self, shard_id: int | str) -> int:
        return int(shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate_proj and up_proj in one matmul: local output = [gate shard | up shard]. A method may fuse the activation
    (`silu_and_mul`: PanelF32Method packs 16-column aligned shards in (gate, up) panel pairs)."""

    gate_up = True

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up [.., I] from one fused GEMM when the method has one, else None."""
        return self.method.silu_and_mul(self, x)


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
        self.shard = self.k_slice = shard or shard_range(input_size, tp.size, tp.rank_in_group)
        super().__init__(self.shard[1], output_size, bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        copy_into(param, self.method.read(loaded, 1, *self.shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins the partial sum on tp_rank 0 only, so the all-reduce adds it exactly once.
        bias = self.bias if self.tp.rank_in_group == 0 else None
        return all_reduce(self.matmul(x, bias), self.tp)
