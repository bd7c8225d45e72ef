"""Pipeline hand-off without shared memory (use_shm=False), consecutive messages in order, and a peer
that dies mid-collective. The collectives themselves are covered in test_comm_collectives.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
import uuid

import pytest
import torch

SLOT_BYTES = 64 * 1024


# ---------------------------------------------------------------- harness

def _entry(fn, rank, world, tp, pp, port, use_shm, launch_id, results, hosts=None) -> None:
    from shardserve.distributed.parallel_state import destroy_parallel_context, init_parallel_context

    torch.set_num_threads(1)
    ctx = None
    nodes = {"host_id": hosts[rank], "secret": b"s" * 32} if hosts else {}      # ranks posing as several nodes
    try:
        ctx = init_parallel_context(rank, world, tp, pp, master_addr="127.0.0.1", master_port=port,
                                    use_shm=use_shm, launch_id=launch_id, timeout_s=60,
                                    shm_slot_bytes=SLOT_BYTES, **nodes)
        results.put((rank, "ok", fn(ctx, launch_id)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if ctx is not None:
            destroy_parallel_context(ctx)


def _segments(launch_id: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if launch_id in n]


def run_ranks(fn, world: int, tp: int, pp: int = 1, use_shm: bool = True, timeout: float = 60,
              hosts: list[str] | None = None) -> list:
    """fn(ctx, launch_id) on each of `world` spawned ranks; their results in rank order. hosts: each rank's node
    (they then hold the launch secret, so groups spanning nodes take the TCP transports)."""
    from shardserve.distributed.parallel_state import create_store

    store = create_store("127.0.0.1", 0, world)  # before the workers start: fast rendezvous
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    launch_id = f"t{uuid.uuid4().hex[:10]}"
    procs = [spawn.Process(target=_entry, args=(fn, r, world, tp, pp, store.port, use_shm, launch_id, results, hosts),
                           daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            got[rank] = value
        for p in procs:
            p.join(timeout=10)
        assert _segments(launch_id) == [], "shared-memory segment left behind"
        return [got[r] for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


# ---------------------------------------------------------------- rank functions

def _message(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "hidden_states": torch.randn(5 + step, 16, generator=g),
        "residual": torch.randn(5 + step, 16, generator=g).to(torch.bfloat16),
        "positions": torch.arange(5 + step, dtype=torch.int64),
        "mask": torch.rand(2, 3, 4, generator=g) > 0.5,
        "empty": torch.empty(0, 16),
        "scalar": torch.tensor(3.5 + step, dtype=torch.float64),
        "a_rather_long_name_" * 5: torch.tensor([step], dtype=torch.int32),  # header beyond 64 words
    }


def _pipeline(ctx, launch_id):
    """tp=2, pp=2, no shm: groups as in the table, and two send/recv hand-offs in order."""
    assert ctx.tp.shm is None and ctx.pp.links == {}
    assert ctx.tp.ranks == [[0, 1], [2, 3]][ctx.pp_rank] and ctx.pp.ranks == [[0, 2], [1, 3]][ctx.tp_rank]
    assert ctx.rank == ctx.pp_rank * 2 + ctx.tp_rank
    _hand_offs(ctx)
    # a TP all-reduce over Gloo on each stage
    from shardserve.distributed import comm
    assert comm.all_reduce(torch.tensor([float(ctx.rank)]), ctx.tp).item() == [1.0, 5.0][ctx.pp_rank]
    return ctx.rank


def _pipeline_on_links(ctx, launch_id):
    """pp=3 with stages 0 and 1 on node "a", stage 2 on node "b", with the launch secret: both hand-offs take TCP
    links (within a node and across); the messages arrive whole and in order."""
    assert sorted(ctx.pp.links) == {0: [1], 1: [0, 2], 2: [1]}[ctx.rank], ctx.pp.links
    _hand_offs(ctx)
    return ctx.rank


def _hand_offs(ctx) -> None:
    """Two messages down the pipeline: each stage receives both from the previous one and passes them on."""
    from shardserve.distributed import comm

    for step in (0, 1):
        if not ctx.pp.is_first:
            got = comm.recv_tensors(ctx.pp.prev_rank, ctx.pp, ctx.device)
            want = _message(step)
            assert list(got) == list(want)
            for name in want:
                assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
        if not ctx.pp.is_last:
            comm.send_tensors(_message(step), ctx.pp.next_rank, ctx.pp)


def _peer_dies(ctx, launch_id):
    """Rank 1 exits without a word; rank 0's shm all-reduce must fail fast, not hang."""
    from shardserve.distributed import comm

    if ctx.rank == 1:
        os._exit(0)
    t0 = time.monotonic()
    try:
        comm.all_reduce(torch.ones(16), ctx.tp)
    except RuntimeError as exc:
        assert "exited" in str(exc)
        return time.monotonic() - t0
    raise AssertionError("all_reduce returned although the peer is gone")


# ---------------------------------------------------------------- tests

@pytest.mark.timeout(120)
def test_pipeline_send_recv_and_gloo_only_groups():
    assert run_ranks(_pipeline, 4, tp=2, pp=2, use_shm=False) == [0, 1, 2, 3]


@pytest.mark.timeout(120)
def test_pipeline_hand_offs_take_tcp_links():
    assert run_ranks(_pipeline_on_links, 3, tp=1, pp=3, hosts=["a", "a", "b"]) == [0, 1, 2]


@pytest.mark.timeout(120)
def test_dead_peer_fails_fast():
    from shardserve.distributed.parallel_state import create_store

    store = create_store("127.0.0.1", 0, 2)
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    launch_id = f"t{uuid.uuid4().hex[:10]}"
    procs = [spawn.Process(target=_entry, args=(_peer_dies, r, 2, 2, 1, store.port, True, launch_id, results),
                           daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, status, value = results.get(timeout=60)
        assert (rank, status) == (0, "ok"), value
        assert value < 5.0, f"took {value:.1f}s to notice the dead peer"
        procs[0].join(timeout=10)
        assert _segments(launch_id) == []
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


@pytest.mark.timeout(60)
def test_segment_creation_failure_is_raised_on_every_member(monkeypatch):
    """When rank 0 cannot create the segment, every member raises ShmUnavailable (threads as ranks),
    so init_parallel_context can fall back to torch.distributed on all of them together."""
    import threading

    import torch.distributed as dist

    from shardserve.distributed import shm_comm

    monkeypatch.setattr(shm_comm, "_SHM_DIR", "/nonexistent-shardserve-dir")
    store, raised = dist.HashStore(), {}

    def member(rank: int) -> None:
        try:
            shm_comm.ShmCommunicator(rank, 3, store, "fail", slot_bytes=1024, timeout_s=10)
            raised[rank] = None
        except shm_comm.ShmUnavailable:
            raised[rank] = "ShmUnavailable"
        except BaseException as exc:  # noqa: BLE001 - reported below
            raised[rank] = repr(exc)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert raised == {r: "ShmUnavailable" for r in range(3)}


@pytest.mark.timeout(60)
def test_peer_gone_right_after_attach_is_still_watched(monkeypatch):
    """A peer that exits between attaching and rank 0 reading the members' pids must still be watched, so the
    first collective fails fast (it used to be taken for a process in another pid namespace, and the wait ran to
    the timeout). Threads as ranks; rank 1 publishes the pid of a process that has already exited."""
    import subprocess
    import threading

    import torch.distributed as dist

    from shardserve.distributed import shm_comm

    gone = subprocess.Popen(["true"])
    gone.wait()
    real_getpid = os.getpid
    monkeypatch.setattr(shm_comm.os, "getpid",
                        lambda: gone.pid if threading.current_thread().name == "rank1" else real_getpid())
    store, comms = dist.HashStore(), {}

    def member(rank: int) -> None:
        comms[rank] = shm_comm.ShmCommunicator(rank, 2, store, "gone", slot_bytes=1024, timeout_s=20)

    threads = [threading.Thread(target=member, args=(r,), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert set(comms) == {0, 1}
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="exited"):
            comms[0].all_reduce(torch.ones(16))
        assert time.monotonic() - t0 < 5.0
    finally:
        for c in comms.values():
            c.close()
