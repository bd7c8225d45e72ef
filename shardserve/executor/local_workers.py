"""This node's worker processes: spawned with their environment, fed by one shared-memory command ring,
answering on one pipe each. Used by the driver (its own node) and by a headless node's agent."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

from shardserve.executor.shm_queue import BroadcastWriter
from shardserve.executor.worker_proc import worker_main
from shardserve.worker.worker import DistInit


class LocalWorkers:
    """procs[i] / conns[i] belong to dist_inits[i] (global rank dist_inits[i].rank)."""

    def __init__(self, config, dist_inits: list[DistInit], child_env: dict[str, str], launch_id: str):
        exit_if_reimporting_main()
        ctx = mp.get_context("spawn")
        self.launch_id = launch_id
        self.ranks = [d.rank for d in dist_inits]
        self.procs: list[mp.Process] = []
        self.conns = []
        # named by launch and first rank: nodes of one launch may share a /dev/shm (namespaces, containers)
        self.ring = BroadcastWriter(f"shardserve-{launch_id}-r{self.ranks[0]}-bcast",
                                    [ctx.Semaphore(0) for _ in dist_inits])
        self.ring_unlinked = False
        try:
            self.beats = ctx.Array("d", len(dist_inits), lock=False)    # each worker's last beat (monotonic)
            for i, dist_init in enumerate(dist_inits):
                parent_end, child_end = ctx.Pipe(duplex=True)
                self.conns.append(parent_end)
                rank_env = {**child_env, "RANK": str(dist_init.rank), "LOCAL_RANK": str(dist_init.local_rank)}
                proc = ctx.Process(target=worker_main, name=f"shardserve-rank{dist_init.rank}", daemon=True,
                                   args=(config, dist_init, child_end, self.ring.reader_handle(i), rank_env,
                                         self.beats, i))
                try:
                    proc.start()
                finally:
                    child_end.close()
                self.procs.append(proc)
        except BaseException:
            self.stop(None)             # whatever part of the launch exists: kill it, unlink the ring
            raise

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


# Exit status of a spawned worker that stopped because it was re-running the parent's main module (no
# `if __name__ == "__main__":` guard around the code that builds the engine); see exit_if_reimporting_main.
MAIN_REIMPORTED_EXIT = 87


def main_guard_advice(main_file: str | None = None) -> str:
    script = f" ({main_file})" if main_file else ""
    return (f"worker processes re-ran your script's top-level code{script} and tried to start shardserve again: "
            "Python's multiprocessing spawn start method imports the main module in every worker. Wrap the "
            "code that creates LLM(...) (or the engine) in `if __name__ == \"__main__\":`")


def exit_if_reimporting_main() -> None:
    """Called before a launch creates anything. In a process that multiprocessing is still bootstrapping (a
    spawned child importing its parent's main module: the script has no main guard), starting workers would
    fail (multiprocessing's "bootstrapping phase" RuntimeError) after this child's own launch had created its
    control port and command ring. Stop this child at once instead, with an exit status the driver recognises
    (MAIN_REIMPORTED_EXIT), so the driver can say what to do."""
    if not getattr(mp.current_process(), "_inheriting", False):    # what multiprocessing itself checks
        return
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    try:
        sys.stderr.write(f"shardserve: worker pid {os.getpid()} is re-running the main module "
                         f"{getattr(main, '__file__', '')} (no `if __name__ == \"__main__\":` guard); stopping it\n")
        sys.stderr.flush()
    finally:
        os._exit(MAIN_REIMPORTED_EXIT)


def death_cause(proc: mp.Process) -> str:
    """How a (dead) worker process ended, in words."""
    proc.join(timeout=1.0)
    code = proc.exitcode
    if code == MAIN_REIMPORTED_EXIT:
        return "stopped at start-up: it re-ran the script's top-level code (no `if __name__ == \"__main__\":` guard)"
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
