"""Multiprocessing executor: one spawned worker process per rank on this node.

The driver creates the rendezvous store first (so workers join in milliseconds), sends every RPC to all
ranks, and reads replies while watching each process's sentinel: a worker that dies or raises becomes a
WorkerError naming its rank and cause, and every other worker is stopped.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import uuid
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import wait

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.distributed.parallel_state import create_store
from shardserve.executor.base import Executor, WorkerError, StepFuture
from shardserve.executor.shm_queue import BroadcastWriter
from shardserve.executor.worker_proc import worker_main
from shardserve.worker.worker import DistInit

STARTUP_TIMEOUT_S = 600.0


class MultiprocExecutor(Executor):
    def __init__(self, config):
        super().__init__(config)
        par = config.parallel
        self.world_size = par.world_size
        self.launch_id = uuid.uuid4().hex[:12]
        host = env.host_ip()
        try:
            self.store = create_store(host, env.base_port() or 0, self.world_size)
        except Exception as exc:
            raise ValueError(f"cannot listen on {host}:{env.base_port()} for rendezvous ({exc}); "
                             "set SHARDSERVE_PORT to a free port or unset it") from exc
        self.output_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size   # last stage, tp 0
        self.procs: list[mp.Process] = []
        self.conns = []
        self.pending: deque[Future] = deque()           # execute_model futures, oldest first
        self.failure: WorkerError | None = None
        self.expected = [0] * self.world_size           # replies each rank still owes us
        self.ring_unlinked = False
        ctx = mp.get_context("spawn")
        self.commands = BroadcastWriter(f"shardserve-{self.launch_id}-bcast",
                                        [ctx.Semaphore(0) for _ in range(self.world_size)])
        child_env = {"WORLD_SIZE": str(self.world_size), "MASTER_ADDR": host, "MASTER_PORT": str(self.store.port)}
        if par.device == "cuda" and "CUDA_VISIBLE_DEVICES" in os.environ:
            child_env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            dist_init = DistInit(rank=rank, local_rank=rank, local_world_size=self.world_size, master_addr=host,
                                 master_port=self.store.port, launch_id=self.launch_id)
            proc = ctx.Process(target=worker_main, name=f"shardserve-rank{rank}", daemon=True,
                               args=(config, dist_init, child_end, self.commands.reader_handle(rank),
                                     {**child_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.conns.append(parent_end)

    # ---- messaging ----------------------------------------------------------------------------------
    def _broadcast(self, method: str, args: tuple, repliers: list[int]) -> None:
        self._raise_if_failed()
        for rank in repliers:
            self.expected[rank] += 1
        try:
            self.commands.write(pickle.dumps((method, args)), alive=self._all_alive)
        except BrokenPipeError:
            self.check_health()

    def _all_alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def _read(self, rank: int, timeout: float | None = None):
        """Wait for rank's next reply, failing fast if any worker dies or raises meanwhile."""
        while True:
            ready = wait([*self.conns, *(p.sentinel for p in self.procs)], timeout)
            if not ready:
                self._fail(WorkerError(f"rank {rank} did not answer within {timeout:.0f} s"))
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
            self._fail(self._death_error(rank))

    def _reply_error(self, rank: int) -> WorkerError:
        status, value = self._recv(rank)
        return WorkerError(f"rank {rank} raised:\n{value}" if status == "error" else
                           f"rank {rank} sent an unexpected reply")

    def _death_error(self, rank: int) -> WorkerError:
        proc = self.procs[rank]
        proc.join(timeout=1.0)
        code = proc.exitcode
        cause = (f"was killed by signal {-code}" if code is not None and code < 0 else
                 f"exited with code {code}" if code is not None else "stopped answering")
        return WorkerError(f"worker rank {rank} (pid {proc.pid}) {cause}")

    def _fail(self, error: WorkerError):
        if self.failure is None:
            self.failure = error
            for future in self.pending:
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()
            self._stop_workers(graceful=False)
        raise self.failure

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    # ---- executor API -------------------------------------------------------------------------------
    def collective_rpc(self, method: str, *args) -> list:
        assert not self.pending, "collective_rpc while steps are in flight"
        self._broadcast(method, args, list(range(self.world_size)))
        timeout = STARTUP_TIMEOUT_S if method in ("init_device", "load_model") else 120.0
        results = [self._read(rank, timeout) for rank in range(self.world_size)]
        if not self.ring_unlinked:
            # Every rank maps the broadcast ring before its first answer: drop the /dev/shm name now (the memory
            # lives while mapped), so even a SIGKILLed driver leaves nothing behind.
            self.ring_unlinked = True
            try:
                os.unlink(self.commands.path)
            except FileNotFoundError:
                pass
        return results

    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        self._broadcast("execute_model", (sched,), [self.output_rank])
        future = StepFuture(self)
        self.pending.append(future)
        return future

    def _resolve_oldest(self) -> None:
        future = self.pending[0]
        value = self._read(self.output_rank, None)
        self.pending.popleft()
        future.set_result(value)

    def check_health(self) -> None:
        self._raise_if_failed()
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._fail(self._death_error(rank))

    def shutdown(self) -> None:
        self._stop_workers(graceful=self.failure is None)

    def _stop_workers(self, graceful: bool) -> None:
        if graceful and self._all_alive() and self.commands is not None:
            try:
                self.commands.write(pickle.dumps(("shutdown", ())), alive=self._all_alive)
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
        self.conns = [_ClosedConn() for _ in self.conns]
        if self.commands is not None:
            self.commands.close()
            self.commands = None
        _unlink_launch_segments(self.launch_id)


class _ClosedConn:
    def close(self):
        pass

    def fileno(self):
        raise OSError("executor is shut down")


def _unlink_launch_segments(launch_id: str) -> None:
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
