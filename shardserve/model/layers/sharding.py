"""How a dimension is split across tensor-parallel ranks, evenly or not (vLLM refuses uneven; we do not)."""
from __future__ import annotations

from dataclasses import dataclass


def even_split(total: int, parts: int) -> list[int]:
    """Sizes of `parts` shards of `total`; the first `total % parts` shards get one extra."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_range(total: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """(start, size) of shard `index` under even_split, in whole `unit`s (quantization blocks) when `total` is a
    multiple of `unit`."""
    if unit > 1 and total % unit == 0:
        start, size = shard_range(total // unit, parts, index)
        return start * unit, size * unit
    sizes = even_split(total, parts)
    return sum(sizes[:index]), sizes[index]


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank owns: query heads [q_start, q_start+q_count), kv heads likewise."""
    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def split_heads(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> HeadShard:
    """Split whole GQA groups across ranks; when tp > kv heads, replicate each kv head on several ranks.

    tp <= kv heads: kv heads split evenly (first ranks get one extra), each rank takes its groups' q heads.
      (9 heads, 3 kv, tp=2 -> rank 0: 6 q + 2 kv, rank 1: 3 q + 1 kv)
    tp > kv heads: ranks split evenly over kv heads; the ranks sharing kv head k split its group's q heads.
      (4 heads, 2 kv, tp=4 -> each rank 1 q head; kv head = rank // 2)
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if tp > num_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) exceeds the model's {num_heads} attention heads; "
                         f"use at most {num_heads}")
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        kv_start, kv_count = shard_range(num_kv_heads, tp, rank)
        return HeadShard(kv_start * group, kv_count * group, kv_start, kv_count)
    ranks_per_kv = even_split(tp, num_kv_heads)       # how many ranks share each kv head
    kv, first = 0, 0
    while rank >= first + ranks_per_kv[kv]:
        first += ranks_per_kv[kv]
        kv += 1
    if ranks_per_kv[kv] > group:
        raise ValueError(f"tensor_parallel_size ({tp}) leaves a rank without a query head "
                         f"({num_heads} heads in {num_kv_heads} kv groups); use a smaller tp")
    q_off, q_count = shard_range(group, ranks_per_kv[kv], rank - first)
    return HeadShard(kv * group + q_off, q_count, kv, 1)
