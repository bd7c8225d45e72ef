"""Rank-group tables and the single-process context (no processes spawned)."""

from __future__ import annotations

import pytest
import torch

from shardserve.distributed import comm
from shardserve.distributed.parallel_state import ParallelContext, ParallelGroup, build_groups


@pytest.mark.parametrize(
    "world,tp,pp,tp_groups,pp_groups",
    [
        (4, 2, 2, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
        (1, 1, 1, [[0]], [[0]]),
        (4, 4, 1, [[0, 1, 2, 3]], [[0], [1], [2], [3]]),
        (4, 1, 4, [[0], [1], [2], [3]], [[0, 1, 2, 3]]),
        (6, 2, 3, [[0, 1], [2, 3], [4, 5]], [[0, 2, 4], [1, 3, 5]]),
    ],
)
def test_build_groups(world, tp, pp, tp_groups, pp_groups):
    assert build_groups(world, tp, pp) == (tp_groups, pp_groups)
    # rank = pp_rank * tp + tp_rank
    for p, row in enumerate(tp_groups):
        for t, rank in enumerate(row):
            assert rank == p * tp + t and pp_groups[t][p] == rank


@pytest.mark.parametrize("world,tp,pp", [(3, 2, 2), (4, 2, 1), (4, 0, 4), (2, 2, 0)])
def test_build_groups_rejects_bad_sizes(world, tp, pp):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        build_groups(world, tp, pp)


def test_group_properties():
    g = ParallelGroup(ranks=[1, 3, 5], rank_in_group=1)
    assert (g.size, g.rank, g.is_first, g.is_last, g.prev_rank, g.next_rank) == (3, 3, False, False, 1, 5)
    with pytest.raises(ValueError):
        ParallelGroup(ranks=[0, 1], rank_in_group=2)


def test_single_context_collectives_are_identity():
    ctx = ParallelContext.single()
    assert (ctx.tp_rank, ctx.pp_rank, ctx.world_size, ctx.device) == (0, 0, 1, torch.device("cpu"))
    x = torch.arange(6.0).view(2, 3)
    assert comm.all_reduce(x, ctx.tp) is x
    assert comm.all_gather(x, ctx.tp) is x
    assert comm.gather_to_first(x, ctx.tp) is x
    comm.barrier(ctx.tp)
