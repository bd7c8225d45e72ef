"""This node's worker processes: spawned with their environment, fed by one shared-memory command ring,
answering on one pipe each. Used by the driver (its own node) and by a headless node's agent."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

from shardserve.executor.shm_queue import BroadcastWriter
from shardserve.executor.worker_proc import worker_main
from shardserve.worker.worker import DistInit


class LocalWorkers:
    """procs[i] / conns[i] belong to dist_inits[i] (global rank dist_inits[i].rank)."""

    def __init__(self, config, dist_inits: list[DistInit], child_env: dict[str, str], launch_id: str):
        ctx = mp.get_context("spawn")
        self.launch_id = launch_id
        self.ranks = [d.rank for d in dist_inits]
        # named by launch and first rank: nodes of one launch may share a /dev/shm (namespaces, containers)
        self.ring = BroadcastWriter(f"shardserve-{launch_id}-r{self.ranks[0]}-bcast",
                                    [ctx.Semaphore(0) for _ in dist_inits])
        self.ring_unlinked = False
        self.procs: list[mp.Process] = []
        self.conns = []
        self.beats = ctx.Array("d", len(dist_inits), lock=False)    # each worker's last liveness beat (monotonic)
        for i, dist_init in enumerate(dist_inits):
            parent_end, child_end = ctx.Pipe(duplex=True)
            rank_env = {**child_env, "RANK": str(dist_init.rank), "LOCAL_RANK": str(dist_init.local_rank)}
            proc = ctx.Process(target=worker_main, name=f"shardserve-rank{dist_init.rank}", daemon=True,
                               args=(config, dist_init, child_end, self.ring.reader_handle(i), rank_env,
                                     self.beats, i))
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.conns.append(parent_end)

    def frozen(self, timeout_s: float) -> list[int]:
        """Indices of live workers whose liveness beat is older than timeout_s (stopped or frozen processes)."""
        now = time.monotonic()
        return [i for i, p in enumerate(self.procs) if self.beats[i] and now - self.beats[i] > timeout_s
                and p.is_alive()]

    def all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def write(self, payload: bytes, alive=None) -> None:
        """Broadcast one pickled command to every local worker (BrokenPipeError if one is gone)."""
        self.ring.write(payload, alive=alive or self.all_alive)

    def unlink_ring(self) -> None:
        """Drop the ring's /dev/shm name once every worker has mapped it (the memory lives while mapped), so
        even a SIGKILLed parent leaves nothing behind."""
        if not self.ring_unlinked:
            self.ring_unlinked = True
            try:
                os.unlink(self.ring.path)
            except FileNotFoundError:
                pass

    def stop(self, shutdown_payload: bytes | None) -> None:
        """Ask the workers to stop (when given the pickled shutdown command), kill what is left, clean up."""
        if shutdown_payload is not None and self.all_alive():
            try:
                self.ring.write(shutdown_payload, alive=self.all_alive)
            except BrokenPipeError:
                pass
            for proc in self.procs:
                proc.join(timeout=5.0)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5.0)
        for conn in self.conns:
            conn.close()
        self.ring.close()
        unlink_launch_segments(self.launch_id)


def death_cause(proc: mp.Process) -> str:
    """How a (dead) worker process ended, in words."""
    proc.join(timeout=1.0)
    code = proc.exitcode
    return (f"was killed by signal {-code}" if code is not None and code < 0 else
            f"exited with code {code}" if code is not None else "stopped answering")


def unlink_launch_segments(launch_id: str) -> None:
    """Remove any shared-memory segment of this launch that a killed worker could not."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if launch_id in name:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
