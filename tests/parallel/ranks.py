"""Run a function on N real worker processes joined by torch.distributed (Gloo), collecting each rank's result."""
from __future__ import annotations

import multiprocessing as mp
import traceback

import torch


def _entry(fn, rank, world, tp, pp, port, use_shm, launch_id, args, results):
    from shardserve.distributed.parallel_state import destroy_parallel_context, init_parallel_context

    torch.set_num_threads(1)
    ctx = None
    try:
        ctx = init_parallel_context(rank, world, tp, pp, master_addr="127.0.0.1", master_port=port,
                                    use_shm=use_shm, launch_id=launch_id, timeout_s=60)
        results.put((rank, "ok", fn(ctx, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if ctx is not None:
            destroy_parallel_context(ctx)


def run_ranks(fn, world: int, *args, tp: int | None = None, pp: int = 1, use_shm: bool = True,
              timeout: float = 120.0) -> list:
    """fn(ctx, *args) on each rank (fn must be importable: defined at module level); results in rank order."""
    from shardserve.distributed.parallel_state import create_store

    import uuid
    store = create_store("127.0.0.1", 0, world)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    launch_id = f"test{uuid.uuid4().hex[:8]}"
    procs = [ctx.Process(target=_entry, args=(fn, r, world, tp or world // pp, pp, store.port, use_shm, launch_id,
                                              args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            got[rank] = value
        return [got[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        del store
