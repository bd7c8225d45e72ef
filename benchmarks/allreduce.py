"""All-reduce latency on the CPU: shared memory vs Gloo, 1 KiB .. 16 MiB, one thread per rank."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import uuid

import torch
import torch.multiprocessing as mp

from shardserve.distributed import comm
from shardserve.distributed.parallel_state import (
    create_store, destroy_parallel_context, init_parallel_context,
)

SIZES = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]  # bytes


def _iters(nbytes: int) -> int:
    return max(20, min(2000, (64 << 20) // nbytes))


def _worker(rank: int, world: int, port: int, launch_id: str, queue) -> None:
    torch.set_num_threads(1)
    ctx = init_parallel_context(rank, world, world, 1, master_addr="127.0.0.1", master_port=port,
                                launch_id=launch_id)
    try:
        shm_group, gloo_group = ctx.tp, dataclasses.replace(ctx.tp, shm=None)
        rows = []
        for nbytes in SIZES:
            x = torch.zeros(nbytes // 4, dtype=torch.float32)  # zeros: repeated sums stay finite
            times: dict[str, list[float]] = {"gloo": [], "shm": []}
            for _ in range(3):  # warm-up
                comm.all_reduce(x, gloo_group)
                comm.all_reduce(x, shm_group)
            n = _iters(nbytes)
            for block in range(10):  # alternate the two sides in blocks: bandwidth drifts over time
                for name, group in (("gloo", gloo_group), ("shm", shm_group)):
                    comm.barrier(gloo_group)
                    for _ in range(max(1, n // 10)):
                        t0 = time.perf_counter()
                        comm.all_reduce(x, group)
                        times[name].append(time.perf_counter() - t0)
            rows.append((nbytes, statistics.median(times["gloo"]) * 1e6, statistics.median(times["shm"]) * 1e6))
        queue.put((rank, rows))
    finally:
        destroy_parallel_context(ctx)


def _fmt_size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def main(argv: list[str] | None = None) -> list[tuple[int, float, float]]:
    """Run the benchmark; print and return rows (bytes, gloo µs, shm µs) as measured on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2, help="number of processes (default 2)")
    args = parser.parse_args(argv)

    store = create_store("127.0.0.1", 0, args.world, timeout_s=120)
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    launch_id = uuid.uuid4().hex[:8]
    procs = [spawn.Process(target=_worker, args=(r, args.world, store.port, launch_id, queue))
             for r in range(args.world)]
    try:
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in range(args.world))
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    rows = results[0]
    print(f"all-reduce float32, {args.world} processes x 1 thread, median µs (rank 0)")
    print(f"{'size':>8} {'gloo µs':>10} {'shm µs':>10} {'speed-up':>9}")
    for nbytes, gloo_us, shm_us in rows:
        print(f"{_fmt_size(nbytes):>8} {gloo_us:>10.1f} {shm_us:>10.1f} {gloo_us / shm_us:>8.1f}x")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
