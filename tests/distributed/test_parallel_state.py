"""Rank-group tables and single-process contexts (no processes spawned)."""

import pytest
import torch

from shardserve.distributed.parallel_state import (
    ParallelContext, ParallelGroup, build_groups, destroy_parallel_context,
)


def test_build_groups_tables():
    assert build_groups(4, 2, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert build_groups(1, 1, 1) == ([[0]], [[0]])
    assert build_groups(4, 4, 1) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert build_groups(4, 1, 4) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    tp, pp = build_groups(6, 2, 3)
    assert tp == [[0, 1], [2, 3], [4, 5]] and pp == [[0, 2, 4], [1, 3, 5]]
    for rank in range(6):  # rank = pp_rank * tp + tp_rank
        assert tp[rank // 2][rank % 2] == rank and pp[rank % 2][rank // 2] == rank


@pytest.mark.parametrize("world,tp,pp", [(3, 2, 2), (4, 3, 1), (2, 0, 2)])
def test_build_groups_rejects(world, tp, pp):
    with pytest.raises(ValueError):
        build_groups(world, tp, pp)


def test_group_neighbours():
    g = ParallelGroup(ranks=[1, 3, 5], rank_in_group=1)
    assert (g.size, g.rank, g.is_first, g.is_last, g.prev_rank, g.next_rank) == (3, 3, False, False, 1, 5)
    first = ParallelGroup(ranks=[1, 3, 5], rank_in_group=0)
    assert first.is_first and first.prev_rank is None and first.next_rank == 3
    last = ParallelGroup(ranks=[1, 3, 5], rank_in_group=2)
    assert last.is_last and last.next_rank is None
    with pytest.raises(ValueError):
        ParallelGroup(ranks=[0, 1], rank_in_group=2)


def test_single_context():
    ctx = ParallelContext.single()
    assert ctx.tp.size == ctx.pp.size == 1 and ctx.world_size == 1
    assert ctx.tp.is_first and ctx.tp.is_last and ctx.pp.next_rank is None
    assert ctx.device == torch.device("cpu")
    destroy_parallel_context(ctx)  # no torch.distributed: a no-op
