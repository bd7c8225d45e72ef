"""Pin each CPU rank to its own cores when a node's ranks fit on its cores: no two ranks share a core."""
from __future__ import annotations

import os

from shardserve.distributed import env


def cores_for_rank(allowed: list[int], local_rank: int, local_world_size: int, threads: int) -> list[int] | None:
    """Local rank r gets allowed[r * threads : (r + 1) * threads]; None (no binding) for a single rank, or when
    the ranks' threads outnumber the allowed cores (then the OS shares the cores out)."""
    if local_world_size <= 1 or local_world_size * threads > len(allowed):
        return None
    return allowed[local_rank * threads:(local_rank + 1) * threads]


def bind_rank(local_rank: int, local_world_size: int, threads: int) -> list[int] | None:
    """Restrict this process (and the threads it starts later) to its cores; returns them, or None if unbound.

    Call before the first parallel region: OpenMP threads keep the mask they were started with. The cores are
    taken from this process's allowed set, so `taskset` or a container's cpuset still decide which cores exist.
    """
    if env.cpu_bind() == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = cores_for_rank(sorted(os.sched_getaffinity(0)), local_rank, local_world_size, threads)
    if cores is not None:
        os.sched_setaffinity(0, cores)
    return cores
