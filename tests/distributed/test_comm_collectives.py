"""Multi-process collectives on the CPU: shared-memory and Gloo paths, pipeline send/recv, cleanup."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import traceback
import uuid

import pytest
import torch
import torch.multiprocessing as mp

from rank_results import collect
from shardserve.distributed import comm
from shardserve.distributed.parallel_state import (
    create_store, destroy_parallel_context, init_parallel_context,
)
from shardserve.distributed.shm_comm import ShmCommunicator

SLOT_BYTES = 64 * 1024  # small shm slots, so the larger sizes below are processed in chunks
SIZES = [1, 7, 4096, 16411, 1 << 20]  # elements; 1 << 20 float32 = 4 MiB = 64 slots
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------ harness (runs in the children)

def _entry(rank, world, tp, pp, port, launch_id, fn_name, queue):
    torch.set_num_threads(1)
    ctx = None
    try:
        ctx = init_parallel_context(rank, world, tp, pp, master_addr="127.0.0.1", master_port=port,
                                    launch_id=launch_id, shm_slot_bytes=SLOT_BYTES, timeout_s=60)
        result = globals()[fn_name](ctx)
        destroy_parallel_context(ctx)
        queue.put((rank, None, result))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))


def _run(fn_name: str, world: int, tp: int, pp: int) -> tuple[str, dict[int, object]]:
    """Run globals()[fn_name](ctx) on `world` spawned ranks; return (launch_id, {rank: result})."""
    launch_id = uuid.uuid4().hex[:8]
    store = create_store("127.0.0.1", 0, world, timeout_s=60)  # master store first: fast rendezvous
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [spawn.Process(target=_entry, args=(r, world, tp, pp, store.port, launch_id, fn_name, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = collect(procs, queue, timeout=90)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return launch_id, results


def _data(rank: int, numel: int, dtype: torch.dtype, integer: bool) -> torch.Tensor:
    """Deterministic per-rank input (every rank can rebuild every other rank's)."""
    g = torch.Generator().manual_seed(1000 * rank + numel)
    if integer:  # small integers: sums are exact in any order, even in bfloat16
        return torch.randint(-8, 9, (numel,), generator=g).to(dtype)
    return torch.randn(numel, generator=g).to(dtype)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _check_collectives(ctx) -> dict[str, str]:
    """All-reduce / all-gather on ctx.tp via shm and via Gloo; returns digests to compare across ranks."""
    group = ctx.tp
    assert group.shm is not None, "CPU TP group on one node should get a shm communicator"
    gloo = dataclasses.replace(group, shm=None)
    me, n = group.rank_in_group, group.size
    digests = {}
    for path, g in (("shm", group), ("gloo", gloo)):
        for dtype in DTYPES:
            for numel in SIZES:
                for integer in (True, False):
                    xs = [_data(r, numel, dtype, integer) for r in range(n)]
                    ref = xs[0].clone()
                    for x in xs[1:]:  # the sum in rank order
                        ref += x
                    out = comm.all_reduce(xs[me].clone(), g)
                    where = f"{path} {dtype} numel={numel} integer={integer}"
                    assert out.dtype == dtype and out.shape == ref.shape, where
                    if path == "shm" or integer:
                        assert torch.equal(out, ref), where
                    else:  # Gloo may add in another order: close, and identical across ranks (digest)
                        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * n)
                    digests[f"ar {where}"] = _digest(out)

            for shape, dim in (((3, 5), -1), ((3, 5), 0), ((4096, 7), 1), ((1,), 0)):
                xs = [_data(r, shape[0] * (shape[1] if len(shape) > 1 else 1), dtype, False).view(shape)
                      for r in range(n)]
                out = comm.all_gather(xs[me], g, dim=dim)
                assert torch.equal(out, torch.cat(xs, dim=dim)), f"all_gather {path} {dtype} {shape} {dim}"
                first = comm.gather_to_first(xs[me], g, dim=dim)
                if group.is_first:
                    assert torch.equal(first, torch.cat(xs, dim=dim))
                else:
                    assert first is None
        comm.barrier(g)
    # Non-contiguous input, and an integer dtype.
    x = torch.arange(12, dtype=torch.float32).view(3, 4).t() * (me + 1)
    assert torch.equal(comm.all_reduce(x, group), torch.arange(12.).view(3, 4).t() * sum(range(1, n + 1)))
    ints = comm.all_reduce(torch.full((5,), me + 1, dtype=torch.int64), group)
    assert ints.tolist() == [n * (n + 1) // 2] * 5
    return digests


def _check_grid(ctx) -> dict:
    """tp=2, pp=2: groups, shm on TP groups, and the stage-to-stage hand-off."""
    info = {"tp": ctx.tp.ranks, "pp": ctx.pp.ranks, "shm": ctx.tp.shm is not None, "pp_shm": ctx.pp.shm}
    me = ctx.rank
    payload = {
        "hidden_states": torch.randn(5, 8, generator=torch.Generator().manual_seed(me)),
        "residual": torch.randn(5, 8, generator=torch.Generator().manual_seed(me)).to(torch.bfloat16),
        "positions": torch.arange(5, dtype=torch.int64).view(5, 1, 1) + me,
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "x" * 300: torch.ones(2, dtype=torch.int8),  # name longer than the first header message
    }
    if ctx.pp.is_first:
        comm.send_tensors(payload, ctx.pp.next_rank, ctx.pp)
        back = comm.recv_tensors(ctx.pp.next_rank, ctx.pp, ctx.device)
        assert torch.equal(back["hidden_states"], payload["hidden_states"] * 2)
    else:
        got = comm.recv_tensors(ctx.pp.prev_rank, ctx.pp, ctx.device)
        sender = ctx.pp.prev_rank
        expected = dict(payload)
        expected["hidden_states"] = torch.randn(5, 8, generator=torch.Generator().manual_seed(sender))
        expected["residual"] = torch.randn(5, 8, generator=torch.Generator().manual_seed(sender)).bfloat16()
        expected["positions"] = torch.arange(5, dtype=torch.int64).view(5, 1, 1) + sender
        assert list(got) == list(expected)
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
        comm.send_tensors({"hidden_states": got["hidden_states"] * 2}, ctx.pp.prev_rank, ctx.pp)
    out = comm.all_reduce(torch.full((3,), float(me)), ctx.tp)
    info["tp_sum"] = out.tolist()
    info["shm_files"] = sorted(f for f in os.listdir("/dev/shm") if f.startswith("shardserve-"))
    return info


# ------------------------------------------------------------------ tests (run in the driver)

@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_all_gather(world):
    launch_id, results = _run("_check_collectives", world, tp=world, pp=1)
    for rank in range(1, world):
        assert results[rank] == results[0], "results differ between ranks"
    assert not [f for f in os.listdir("/dev/shm") if launch_id in f]


@pytest.mark.timeout(120)
def test_grid_and_pipeline_handoff():
    launch_id, results = _run("_check_grid", 4, tp=2, pp=2)
    assert [results[r]["tp"] for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [results[r]["pp"] for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(results[r]["shm"] and results[r]["pp_shm"] is None for r in range(4))
    assert [results[r]["tp_sum"] for r in range(4)] == [[1.0] * 3] * 2 + [[5.0] * 3] * 2
    # Segment names are unlinked as soon as every member has attached, and nothing is left after destroy.
    assert all(launch_id not in f for r in range(4) for f in results[r]["shm_files"])
    assert not [f for f in os.listdir("/dev/shm") if launch_id in f]


@pytest.mark.timeout(60)
def test_shm_communicator_in_threads_and_close():
    """The communicator itself, with threads as ranks (fast): chunking, gather, close, no file left."""
    import torch.distributed as dist

    world, store, name = 3, dist.HashStore(), f"t{uuid.uuid4().hex[:8]}"
    results, errors = {}, []

    def rank_main(rank):
        try:
            c = ShmCommunicator(rank, world, store, name, slot_bytes=1000, timeout_s=20)  # rounded to 1024
            try:
                xs = [torch.randn(3003, generator=torch.Generator().manual_seed(r)) for r in range(world)]
                ref = (xs[0] + xs[1]) + xs[2]
                results[rank] = (torch.equal(c.all_reduce(xs[rank].clone()), ref),
                                 torch.equal(c.all_gather(xs[rank].view(3, -1), 0), torch.cat(xs).view(9, -1)),
                                 os.path.exists(c.path))
                c.barrier()
            finally:
                c.close()
                c.close()  # idempotent
            with pytest.raises(RuntimeError):
                c.all_reduce(torch.ones(1))
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, "\n".join(errors)
    assert results == {r: (True, True, False) for r in range(world)}
    assert not [f for f in os.listdir("/dev/shm") if name in f]
