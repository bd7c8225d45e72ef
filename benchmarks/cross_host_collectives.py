"""Collectives across two hosts (network namespaces on a veth pair): shardserve's TCP collectives vs Gloo vs a raw TCP
round trip (and Open MPI through mpi4py with --mpi, when importable), all-reduce and all-gather by size."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "multinode"))
STORE_PORT, PING_PORT = 29621, 29622
SIZES = [2048, 65536, 1 << 20, 16 << 20]          # bytes of float32 per rank ([8, 64] float32 = 2 KiB)


def _time(fn, iters: int) -> tuple[float, float]:
    """(mean, median) µs over `iters` back-to-back calls after 20 warm-up calls."""
    for _ in range(20):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.mean(ts) * 1e6, statistics.median(ts) * 1e6


def _iters(nbytes: int, base: int) -> int:
    return max(20, min(base, base * 65536 // max(nbytes, 1)))


def rank_main(rank: int, world: int, master: str, host_id: str, iters: int) -> None:
    """One rank: raw ping-pong with its partner (rank ^ 1 on the other host), then Gloo and TCP collectives
    alternating per size on the same tensors. Rank 0 prints one JSON line."""
    import socket

    import torch
    import torch.distributed as dist

    from shardserve.distributed import comm
    from shardserve.distributed.parallel_state import create_store, destroy_parallel_context, init_parallel_context
    from shardserve.worker.malloc_tuning import keep_freed_memory
    keep_freed_memory()                            # as every worker does: large buffers are not re-faulted per call
    torch.set_num_threads(1)
    out: dict = {}
    partner = 1 if world == 2 else 2               # rank 0's first peer on the other host
    if rank in (0, partner):
        if rank == 0:
            with socket.create_server((master, PING_PORT)) as srv:
                sock = srv.accept()[0]
        else:
            for _ in range(200):
                try:
                    sock = socket.create_connection((master, PING_PORT))
                    break
                except OSError:
                    time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(8)

        def ping():
            if rank == 0:
                sock.sendall(b"x" * 8)
                sock.recv_into(buf, 8, socket.MSG_WAITALL)
            else:
                sock.recv_into(buf, 8, socket.MSG_WAITALL)
                sock.sendall(b"x" * 8)
        out["rtt"] = _time(ping, iters)
        sock.close()
    store = create_store(master, STORE_PORT, world) if rank == 0 else None
    ctx = init_parallel_context(rank, world, world, 1, master_addr=master, master_port=STORE_PORT, store=store,
                                launch_id="bench", host_id=host_id, timeout_s=60,
                                secret=os.environ["BENCH_SECRET"].encode())
    tp = ctx.tp
    out["transport"] = "tcp+shm" if tp.net.team is not None else "tcp"
    for nbytes in SIZES:
        x = torch.randn(nbytes // 4)
        n = _iters(nbytes, iters)
        parts = [torch.empty_like(x) for _ in range(world)]
        out[nbytes] = {
            "gloo_ar": _time(lambda: dist.all_reduce(x, group=tp.group), n),
            "tcp_ar": _time(lambda: comm.all_reduce(x, tp), n),
            "gloo_ag": _time(lambda: dist.all_gather(parts, x, group=tp.group), n),
            "tcp_ag": _time(lambda: comm.all_gather(x, tp), n),
        }
        comm.barrier(tp)
    destroy_parallel_context(ctx)
    if rank == 0:
        print(json.dumps(out), flush=True)


MPI_SCRIPT = r"""
import json, statistics, sys, time, numpy as np
from mpi4py import MPI
comm, iters = MPI.COMM_WORLD, int(sys.argv[1])
def t(fn, n):
    for _ in range(20): fn()
    comm.Barrier(); ts = []
    for _ in range(n):
        s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
    return statistics.mean(ts) * 1e6, statistics.median(ts) * 1e6
out = {}
for nbytes in %s:
    x = np.random.randn(nbytes // 4).astype(np.float32); y = np.empty_like(x)
    g = np.empty((comm.Get_size(), x.size), np.float32)
    n = max(20, min(iters, iters * 65536 // nbytes))
    out[nbytes] = {"mpi_ar": t(lambda: comm.Allreduce(x, y), n), "mpi_ag": t(lambda: comm.Allgather(x, g), n)}
if comm.Get_rank() == 0: print(json.dumps(out), flush=True)
""" % SIZES


def run_mpi(a, b, world: int, iters: int) -> dict:
    """Open MPI's TCP transport between the namespaces: mpirun in A, its daemon started in B through an
    `ip netns exec` launch agent; --bind-to none (both "hosts" share the cores)."""
    tmp = f"/tmp/xhc-{uuid.uuid4().hex[:6]}"
    os.makedirs(tmp)
    agent, script = f"{tmp}/agent", f"{tmp}/mpi_bench.py"
    with open(agent, "w") as f:
        f.write(f"#!/bin/sh\nhost=$1; shift\ncase $host in {a.ip}) ns={a.ns};; {b.ip}) ns={b.ns};; *) exit 1;; esac\n"
                'exec ip netns exec $ns sh -c "$*"\n')
    os.chmod(agent, 0o755)
    with open(script, "w") as f:
        f.write(MPI_SCRIPT)
    per = world // 2
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    argv = ["mpirun", "-np", str(world), "--host", f"{a.ip}:{per},{b.ip}:{per}", "--bind-to", "none",
            "--mca", "plm_rsh_agent", agent, "--mca", "btl", "tcp,self" if per == 1 else "tcp,vader,self",
            "--mca", "btl_tcp_if_include", "10.213.7.0/24", "--mca", "oob_tcp_if_include", "10.213.7.0/24",
            "-x", "PYTHONPATH", sys.executable, script, str(iters)]
    proc = a.run(argv, env=env, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"mpirun failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, default=2, choices=(2, 4), help="2: one per host; 4: two per host")
    ap.add_argument("--iters", type=int, default=1000, help="calls per measurement at <= 64 KiB (fewer above)")
    ap.add_argument("--mpi", action="store_true", help="also Open MPI via mpi4py (must be importable)")
    args = ap.parse_args()
    import netns_hosts as netns
    if reason := netns.available():
        sys.exit(f"cross_host_collectives.py: {reason}")
    with open("/proc/loadavg") as f:
        print(f"load average before: {' '.join(f.read().split()[:3])}", flush=True)
    with netns.two_hosts() as (a, b):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               "BENCH_SECRET": uuid.uuid4().hex * 2}
        procs = []
        for rank in range(args.ranks):
            host = (a, b)[rank % 2] if args.ranks == 2 else (a, b)[rank // 2]
            argv = [sys.executable, os.path.abspath(__file__), "_rank", str(rank), str(args.ranks), a.ip, host.ip,
                    str(args.iters)]
            procs.append(host.popen(argv, {**env, "GLOO_SOCKET_IFNAME": host.ifname}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=900) for p in procs]
        for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
            if p.returncode != 0:
                sys.exit(f"rank {rank} failed:\n{err[-4000:]}")
        res = json.loads(outs[0][0].strip().splitlines()[-1])
        mpi = run_mpi(a, b, args.ranks, args.iters) if args.mpi else None
    rtt = res.get("rtt")
    print(f"\n{args.ranks} ranks over two hosts ({res['transport']}), float32; mean (median) µs per call; "
          + (f"raw TCP round trip {rtt[0]:.0f} ({rtt[1]:.0f}) µs" if rtt else ""))
    cols = ["gloo_ar", "tcp_ar"] + (["mpi_ar"] if mpi else []) + ["gloo_ag", "tcp_ag"] + (["mpi_ag"] if mpi else [])
    names = {"gloo_ar": "Gloo all-reduce", "tcp_ar": "TCP all-reduce", "mpi_ar": "MPI all-reduce",
             "gloo_ag": "Gloo all-gather", "tcp_ag": "TCP all-gather", "mpi_ag": "MPI all-gather"}
    print("| bytes per rank | " + " | ".join(names[c] for c in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for nbytes in SIZES:
        row = {**res[str(nbytes)], **(mpi[nbytes] if mpi else {})}
        print(f"| {nbytes} | " + " | ".join(f"{row[c][0]:.0f} ({row[c][1]:.0f})" for c in cols) + " |")
    with open("/proc/loadavg") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        rank_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        main()
