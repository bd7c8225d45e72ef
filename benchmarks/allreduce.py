"""All-reduce latency on the CPU: shared memory vs Gloo, 1 KiB .. 16 MiB, one thread per rank."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from shardserve.distributed import comm  # noqa: E402
from shardserve.distributed.parallel_state import (  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table (median µs on rank 0); 0 on success."""
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
    print(f"all-reduce float32, {args.world} processes x 1 thread, median µs on rank 0\n")
    print("| size | gloo µs | shm µs | speed-up |")
    print("|---:|---:|---:|---:|")
    for nbytes, gloo_us, shm_us in rows:
        print(f"| {_fmt_size(nbytes)} | {gloo_us:.1f} | {shm_us:.1f} | {gloo_us / shm_us:.1f}x |")
    return 0 if all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
