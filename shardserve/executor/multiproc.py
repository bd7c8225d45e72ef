"""Multiprocessing executor: one spawned worker process per rank, on this node and on headless nodes.

The driver opens its authenticated control port first (the ranks' rendezvous store, and where headless nodes
join), spawns this node's ranks, links in every headless node's ranks (--nnodes), sends every RPC to all
ranks, and reads replies while watching each rank's sentinel (process sentinel here, heartbeat-backed
stand-in for remote ranks): a worker that dies, raises or goes silent becomes a WorkerError naming its rank
and cause, and every other worker is stopped.
"""
from __future__ import annotations

import pickle
import sys
import time
from concurrent.futures import Future
from multiprocessing.connection import wait
from typing import Callable

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.executor.base import Executor, MainModuleReimportedError, WorkerError
from shardserve.executor.launch import Launch, mp_launch
from shardserve.executor.local_workers import (MAIN_REIMPORTED_EXIT, death_cause, exit_if_reimporting_main,
                                               main_guard_advice)
from shardserve.executor.node_link import RemoteRank

STARTUP_TIMEOUT_S = 600.0
LIVENESS_POLL_S = 1.0           # how often a waiting driver checks its local workers' liveness beats
REMOTE_DEATH_REPORT_S = 3.0     # how long a lost direct connection waits for the agent's word on the rank


class MultiprocExecutor(Executor):
    def __init__(self, config, launch: Callable[[], Launch] | None = None):
        """launch: what starts the ranks (default: this node's, plus --nnodes headless nodes')."""
        exit_if_reimporting_main()          # a worker re-running an unguarded script: stop before creating anything
        super().__init__(config)
        par = config.parallel
        self.world_size = par.world_size
        self.output_rank = par.output_rank
        self.expected = [0] * self.world_size           # replies each rank still owes us
        self.heartbeat_timeout = env.heartbeat_timeout()
        self.launch = launch() if launch is not None else mp_launch(config)
        self.procs: list = self.launch.procs            # mp.Process here, RemoteRank for other nodes; rank order
        self.conns: list = self.launch.conns            # reply connection per rank

    @property
    def pids(self) -> list[int]:
        """Every rank's worker pid, rank order (on its own host)."""
        return [p.pid for p in self.procs]

    # ---- messaging ----------------------------------------------------------------------------------
    def _broadcast(self, method: str, args: tuple, repliers: list[int]) -> None:
        self._raise_if_failed()
        for rank in repliers:
            self.expected[rank] += 1
        payload = pickle.dumps((method, args))
        try:
            self.launch.send(payload, alive=self._all_alive)
        except BrokenPipeError:
            self.check_health()

    def _all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def _read(self, rank: int, timeout: float | None = None):
        """Wait for rank's next reply, failing fast if any worker dies or raises meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = wait([*self.conns, *(p.sentinel for p in self.procs)], LIVENESS_POLL_S)
            if not ready:
                frozen = self.launch.frozen(self.heartbeat_timeout)
                if frozen:
                    r = frozen[0]
                    self._fail(WorkerError(f"worker rank {r} (pid {self.procs[r].pid}) stopped answering: no "
                                           f"liveness beat for {self.heartbeat_timeout:.0f} s (stopped or frozen)"))
                if deadline is not None and time.monotonic() > deadline:
                    self._fail(WorkerError(f"rank {rank} did not answer within {timeout:.0f} s"))
                continue
            for r, conn in enumerate(self.conns):
                if conn in ready and r != rank and not self.expected[r]:
                    self._fail(self._reply_error(r))      # an unexpected message is always an error
            for r, proc in enumerate(self.procs):
                if proc.sentinel in ready and (self.conns[r] not in ready or not self.expected[r]):
                    self._fail(self._death_error(r))
            if self.conns[rank] in ready:
                status, value = self._recv(rank)
                self.expected[rank] -= 1
                if status == "error":
                    self._fail(WorkerError(f"rank {rank} raised:\n{value}"))
                return value

    def _recv(self, rank: int):
        try:
            return pickle.loads(self.conns[rank].recv_bytes())
        except (EOFError, OSError):
            pass
        self._fail(self._death_error(rank))

    def _reply_error(self, rank: int) -> WorkerError:
        status, value = self._recv(rank)
        return WorkerError(f"rank {rank} raised:\n{value}" if status == "error" else
                           f"rank {rank} sent an unexpected reply")

    def _death_error(self, rank: int) -> WorkerError:
        proc = self.procs[rank]
        if isinstance(proc, RemoteRank):
            # a rank answering on its own connection: its node's agent tells how it ended, a moment later
            wait([proc.sentinel], REMOTE_DEATH_REPORT_S)
            return WorkerError(proc.describe_death())
        cause = death_cause(proc)
        if proc.exitcode == MAIN_REIMPORTED_EXIT:
            main_file = getattr(sys.modules.get("__main__"), "__file__", None)
            return MainModuleReimportedError(f"{main_guard_advice(main_file)} (worker rank {rank}, pid {proc.pid}, "
                                             "stopped at start-up)")
        return WorkerError(f"worker rank {rank} (pid {proc.pid}) {cause}")

    def _fail(self, error: WorkerError):
        if self.failure is None:
            self._fail_pending(error)
            self._stop_workers(graceful=False)
        raise self.failure

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    # ---- executor API -------------------------------------------------------------------------------
    def start(self) -> int:
        """Executor.start, and on any failure (a worker that dies or raises, a timeout, an error or interrupt
        here) stop every worker and release what the launch created before the error propagates."""
        try:
            return super().start()
        except BaseException:
            self._stop_workers(graceful=False)
            raise

    def collective_rpc(self, method: str, *args) -> list:
        assert not self.pending, "collective_rpc while steps are in flight"
        self._broadcast(method, args, list(range(self.world_size)))
        timeout = STARTUP_TIMEOUT_S if method in ("init_device", "load_model") else 120.0
        results = [self._read(rank, timeout) for rank in range(self.world_size)]
        self.launch.unlink_ring()      # every local rank mapped the ring before its first answer
        return results

    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        self._broadcast("execute_model", (sched,), [self.output_rank])
        return self._submit(None)

    def _collect(self, payload) -> ModelRunnerOutput:
        return self._read(self.output_rank, None)

    def check_health(self) -> None:
        self._raise_if_failed()
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._fail(self._death_error(rank))

    def shutdown(self) -> None:
        self._stop_workers(graceful=self.failure is None)

    def _stop_workers(self, graceful: bool) -> None:
        self.launch.stop(graceful and self._all_alive())
        self.conns[:] = [_ClosedConn() for _ in self.conns]


class _ClosedConn:
    def close(self):
        pass

    def fileno(self):
        raise OSError("executor is shut down")
