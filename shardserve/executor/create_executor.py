"""create_executor: the executor a config's distributed_executor_backend names (imported only when chosen)."""
from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.executor.base import Executor


def create_executor(config: EngineConfig) -> Executor:
    backend = config.parallel.backend
    if backend == "uni":
        from shardserve.executor.uniproc import UniProcExecutor
        return UniProcExecutor(config)
    if backend == "mp":
        from shardserve.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config)
    if backend == "ray":
        from shardserve.distributed import env
        if env.ray_compiled_dag():
            from shardserve.executor.ray_compiled_dag import RayCompiledDagExecutor
            return RayCompiledDagExecutor(config)
        from shardserve.executor.ray import RayExecutor
        return RayExecutor(config)
    if backend == "external_launcher":
        from shardserve.executor.external import ExternalLauncherExecutor
        return ExternalLauncherExecutor(config)
    raise ValueError(f"distributed_executor_backend {backend!r} is not supported; use uni, mp, ray or external_launcher")
