"""Single-rank executor: the worker lives in the driver process."""
from __future__ import annotations

from concurrent.futures import Future

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.executor.base import Executor
from shardserve.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config):
        super().__init__(config)
        self.worker = Worker(config)

    def collective_rpc(self, method: str, *args) -> list:
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        future: Future = Future()
        try:
            future.set_result(self.worker.execute_model(sched))
        except Exception as exc:          # surfaces at .result(), like the multi-process executors
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        self.worker.shutdown()
