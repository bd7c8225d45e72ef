"""Executor interface: the bridge between the driver (engine) and the workers (one per rank)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future

from shardserve.config import EngineConfig
from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput


class WorkerError(RuntimeError):
    """A worker died, stopped answering or raised; the message names the rank and the cause."""


class MainModuleReimportedError(WorkerError):
    """A spawned worker re-ran the script's top-level code (no `if __name__ == "__main__":` guard)."""


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config
        self.num_blocks = 0
        self.kv_cache_bytes = 0          # the largest rank's KV cache, after start()
        # steps submitted and not yet resolved, oldest first: (future, what _collect needs to resolve it)
        self.pending: deque[tuple[StepFuture, object]] = deque()
        self.failure: BaseException | None = None      # the first failure; every later call raises it

    @property
    def max_concurrent_batches(self) -> int:
        """Batches the engine may keep in flight: one per pipeline stage."""
        return self.config.parallel.pipeline_parallel_size

    def start(self) -> int:
        """Bring every rank up, size the KV cache (the minimum over ranks wins) and return its block count."""
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")
        self.num_blocks = min(self.collective_rpc("num_available_blocks"))
        if self.num_blocks < 1:
            raise ValueError("no memory left for the KV cache; set kv_cache_memory (bytes) or free memory")
        self.kv_cache_bytes = max(self.collective_rpc("init_cache", self.num_blocks))
        return self.num_blocks

    @abstractmethod
    def collective_rpc(self, method: str, *args) -> list:
        """Call Worker.<method>(*args) on every rank; results in rank order."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        """Start one step on every rank; the future resolves to the last stage's sampled tokens."""

    def check_health(self) -> None:
        self.collective_rpc("check_health")

    # ---- steps in flight (executors whose steps resolve later: mp, Ray, external launcher) ------------------
    def _submit(self, payload) -> StepFuture:
        """A future for a step just sent, resolved (in submission order) by _collect(payload)."""
        future = StepFuture(self)
        self.pending.append((future, payload))
        return future

    def _collect(self, payload):
        """The last stage's output of the oldest step; on a failure, _fail_pending and raise."""
        raise NotImplementedError

    def _resolve_oldest(self) -> None:
        future, payload = self.pending[0]
        value = self._collect(payload)
        self.pending.popleft()
        future.set_result(value)

    def _fail_pending(self, error: BaseException) -> None:
        """Record the first failure and hand it to every step still in flight."""
        if self.failure is None:
            self.failure = error
        for future, _ in self.pending:
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every worker and release what the launch created; safe to call twice."""


class StepFuture(Future):
    """A step's result, resolved lazily and in submission order when someone asks for it.

    The executor keeps its unresolved futures, oldest first, in `pending` and resolves the oldest with
    `_resolve_oldest()`; with pipeline parallelism several steps are in flight at once.
    """

    def __init__(self, executor: Executor):
        super().__init__()
        self.executor = executor

    def result(self, timeout=None):
        while not self.done() and self.executor.pending:
            self.executor._resolve_oldest()
        return super().result(timeout)

