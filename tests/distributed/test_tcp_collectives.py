"""TCP collectives across "hosts" (loopback addresses 127.0.0.x as node identities, local processes): the same
bits as the rank-order sum on every member, matching torch's Gloo collectives on random tensors (1 B .. 16 MiB,
float32 and bf16, 2-4 ranks, flat and with shared-memory teams), refused strangers, a dead peer named at once."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rank_results import collect
from shardserve.distributed import comm
from shardserve.distributed.parallel_state import create_store, destroy_parallel_context, init_parallel_context
from shardserve.distributed.tcp_collectives import LARGE_BYTES
from shardserve.distributed.tcp_mesh import TcpMesh

SECRET = b"tcp-collectives-test-secret-0123456789"
# elements: 1, odd, just over LARGE_BYTES in float32 (chunked path), 1 MiB + 1, 16 MiB of float32
SIZES = [1, 7, 4099, LARGE_BYTES // 4 + 5, (1 << 18) + 1, 1 << 22]
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = {                                    # node of each rank
    "2-flat": ["127.0.0.1", "127.0.0.2"],
    "3-flat": ["127.0.0.1", "127.0.0.2", "127.0.0.3"],
    "4-doubling": ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"],
    "4-teams-2x2": ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"],
    "3-teams-2+1": ["127.0.0.1", "127.0.0.2", "127.0.0.1"],
}


# ------------------------------------------------------------------ harness (runs in the children)

def _entry(rank, hosts, port, launch_id, fn_name, queue):
    torch.set_num_threads(1)
    try:
        ctx = init_parallel_context(rank, len(hosts), len(hosts), 1, master_addr="127.0.0.1", master_port=port,
                                    launch_id=launch_id, timeout_s=30, host_id=hosts[rank], secret=SECRET,
                                    shm_slot_bytes=256 * 1024)
        try:
            result = globals()[fn_name](ctx)
        finally:
            destroy_parallel_context(ctx)
        queue.put((rank, None, result))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))


def _spawn(fn_name: str, hosts: list[str]):
    store = create_store("127.0.0.1", 0, len(hosts), timeout_s=60)
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    launch_id = uuid.uuid4().hex[:8]
    procs = [spawn.Process(target=_entry, args=(r, hosts, store.port, launch_id, fn_name, queue))
             for r in range(len(hosts))]
    for p in procs:
        p.start()
    return store, procs, queue


def _run(fn_name: str, hosts: list[str]) -> dict[int, object]:
    store, procs, queue = _spawn(fn_name, hosts)
    return collect(procs, queue, timeout=120)


def _data(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * rank + numel)
    return torch.randn(numel, generator=g).to(dtype)


def _check_against_torch(ctx) -> None:
    """Every size and dtype, on every rank: all_reduce == the rank-order sum bit for bit (so every rank holds the
    same bits) and ~= Gloo's; all_gather and gather_to_first == Gloo's all_gather exactly."""
    tp = ctx.tp
    assert tp.net is not None and tp.shm is None
    hosts = len(set(os.environ.get("TCP_TEST_HOSTS", "").split(",")))
    n_nodes = len({tuple(r) for r in tp.net.rows})
    assert n_nodes == hosts, (tp.net.rows, hosts)   # one participant per node: the teams use shared memory
    n, me = tp.size, tp.rank_in_group
    for dtype in DTYPES:
        for numel in SIZES if dtype == torch.float32 else SIZES[:-1]:     # 16 MiB once, in float32
            xs = [_data(r, numel, dtype) for r in range(n)]
            ref = xs[0] + xs[1]
            for x in xs[2:]:
                ref += x
            got = comm.all_reduce(xs[me].clone(), tp)
            assert torch.equal(got, ref), (dtype, numel)
            gloo = xs[me].clone()
            dist.all_reduce(gloo, group=tp.group)
            # both within the rounding bound of a sum of n terms: (n - 1) eps sum|x_i| around the exact sum
            exact = sum(x.double() for x in xs)
            bound = (n - 1) * torch.finfo(dtype).eps * sum(x.double().abs() for x in xs) + 1e-30
            for side in (got, gloo):
                assert bool(((side.double() - exact).abs() <= bound).all()), (dtype, numel)
            shaped = xs[me].view(1, -1)
            parts = [torch.empty_like(shaped) for _ in range(n)]
            dist.all_gather(parts, shaped, group=tp.group)
            for dim in (0, -1):
                assert torch.equal(comm.all_gather(shaped, tp, dim=dim), torch.cat(parts, dim=dim))
            first = comm.gather_to_first(shaped, tp, dim=-1)
            assert (first is None) == (me != 0) and (first is None or torch.equal(first, torch.cat(parts, -1)))
    small = torch.tensor([me + 1], dtype=torch.uint8)                       # 1 byte
    assert comm.all_reduce(small, tp).item() == n * (n + 1) // 2
    assert comm.all_gather(torch.tensor([me], dtype=torch.uint8), tp).tolist() == list(range(n))
    comm.barrier(tp)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tcp_collectives_match_torch(layout, monkeypatch):
    monkeypatch.setenv("TCP_TEST_HOSTS", ",".join(LAYOUTS[layout]))      # read by the spawned children
    start = time.monotonic()
    _run("_check_against_torch", LAYOUTS[layout])         # a failed check on any rank fails the test
    print(f"{layout}: {time.monotonic() - start:.1f} s")


# ------------------------------------------------------------------ a dead peer

def _loop_until_error(ctx) -> dict:
    comm.all_reduce(torch.ones(8, 64), ctx.tp)
    open(os.environ["TCP_TEST_MARKER"], "w").close()      # both ranks are connected and reducing
    try:
        while True:
            comm.all_reduce(torch.ones(8, 64), ctx.tp)
    except Exception as exc:                            # noqa: BLE001 - the error is the result
        return {"error": f"{type(exc).__name__}: {exc}", "at": time.time()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hosts,victim", [(["127.0.0.1", "127.0.0.2"], 1),
                                         (["127.0.0.1", "127.0.0.2", "127.0.0.1"], 2)],
                         ids=["lone-peer", "team-member-on-the-other-host"])
def test_killed_peer_fails_every_survivor_at_once(tmp_path, monkeypatch, hosts, victim):
    """SIGKILL of one member mid-loop: each survivor raises within 10 s (the pair: at once, naming the dead peer;
    a dead team member: its leader sees it through shared memory and closes the mesh, so the other host fails too)."""
    marker = tmp_path / "looping"
    monkeypatch.setenv("TCP_TEST_MARKER", str(marker))
    store, procs, queue = _spawn("_loop_until_error", hosts)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs)
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed = time.time()
        for _ in range(len(hosts) - 1):
            rank, err, result = queue.get(timeout=30)
            assert rank != victim and err is None, err
            assert result["at"] - killed < 10, result
            print(f"rank {rank}: {1e3 * (result['at'] - killed):.0f} ms after the kill: {result['error']}")
            if len(hosts) == 2:
                assert f"rank {victim} (127.0.0.2:" in result["error"], result
                assert "closed the connection" in result["error"] or "is gone" in result["error"], result
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)


# ------------------------------------------------------------------ strangers are refused

@pytest.mark.timeout(60)
def test_wrong_secret_is_refused_and_named_on_both_sides():
    store = dist.HashStore()
    errors: dict[int, str] = {}

    def member(i: int, secret: bytes):
        try:
            TcpMesh(i, 2, store, "wrong-secret", host="127.0.0.1", secret=secret, timeout_s=5,
                    labels=["rank 0", "rank 1"])
        except Exception as exc:                        # noqa: BLE001
            errors[i] = str(exc)

    threads = [threading.Thread(target=member, args=(0, SECRET)),
               threading.Thread(target=member, args=(1, b"not-the-launch-secret-at-all"))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert time.monotonic() - start < 10
    assert "rank 1 could not authenticate with rank 0 (127.0.0.1:" in errors[1], errors
    assert errors[0] == errors[1]                      # rank 0 reports the same cause, not a bare timeout


@pytest.mark.timeout(60)
def test_unauthenticated_connection_is_dropped_and_the_mesh_still_forms():
    import socket
    store = dist.HashStore()
    meshes: dict[int, TcpMesh] = {}

    def member(i: int):
        meshes[i] = TcpMesh(i, 2, store, "stranger", host="127.0.0.1", secret=SECRET, timeout_s=10)

    t0 = threading.Thread(target=member, args=(0,))
    t0.start()
    host, port, _ = store.get("shardserve/tcpmesh/stranger/addr/0").decode().split("|")
    with socket.create_connection((host, int(port))) as stranger:          # no secret: talks garbage
        stranger.recv(64)
        stranger.sendall(os.urandom(64))
        assert stranger.recv(64) == b""                                   # dropped
    t1 = threading.Thread(target=member, args=(1,))
    t1.start()
    t0.join(timeout=20)
    t1.join(timeout=20)
    a, b = meshes[0], meshes[1]
    try:
        x, y = bytearray(b"0123"), bytearray(4)
        t = threading.Thread(target=lambda: b.exchange([(0, [memoryview(b"abcd")])], [(0, [memoryview(y)])]))
        t.start()
        a.exchange([(1, [memoryview(x)])], [(1, [memoryview(x)])])
        t.join(timeout=10)
        assert bytes(x) == b"abcd" and bytes(y) == b"0123"
    finally:
        a.close()
        b.close()
