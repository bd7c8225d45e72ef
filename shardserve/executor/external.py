"""External-launcher executor: torchrun or mpirun starts every rank, and each runs the same engine (SPMD).

Every process builds the same LLM with the same seed and adds the same requests, so every engine schedules
the same steps in the same order. The executor holds this rank's Worker only: collective_rpc calls it
locally, execute_model runs it and then the output rank (last PP stage, tp_rank 0) broadcasts the sampled
ModelRunnerOutput to every rank, so every scheduler receives identical updates.

Rendezvous: rank 0 hosts a TCPStore on MASTER_PORT + 1 (torchrun's agent already listens on MASTER_PORT);
every rank connects to MASTER_ADDR there. Under mpirun, which sets neither, MASTER_ADDR defaults to
127.0.0.1 (one node only) and the base port to SHARDSERVE_PORT or 29500, so the store is on 29501.
"""
from __future__ import annotations

import datetime
import uuid
from concurrent.futures import Future

import torch
import torch.distributed as dist

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.distributed.parallel_state import create_store
from shardserve.executor.base import Executor, WorkerError
from shardserve.worker.worker import DistInit, Worker

DEFAULT_BASE_PORT = 29500        # base port under mpirun when neither MASTER_PORT nor SHARDSERVE_PORT is set
STORE_PORT_OFFSET = 1            # our TCPStore listens on base + 1: torchrun's agent store owns MASTER_PORT
TIMEOUT_S = 300.0
_LAUNCH_ID_KEY = "shardserve/external/launch_id"


def rendezvous_address(world_size: int, local_world_size: int) -> tuple[str, int]:
    """(host, port) of the TCPStore rank 0 hosts: MASTER_ADDR (default 127.0.0.1 on one node) and
    (MASTER_PORT or SHARDSERVE_PORT or 29500) + 1."""
    addr = env.master_addr()
    if addr is None:
        if local_world_size < world_size:
            raise ValueError(
                f"the {world_size} ranks span several nodes ({local_world_size} on this one) but MASTER_ADDR is "
                "not set; set MASTER_ADDR to rank 0's host address (mpirun does not set it; torchrun does), "
                "e.g. mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port>")
        addr = "127.0.0.1"
    base = env.master_port() or env.base_port() or DEFAULT_BASE_PORT
    if base + STORE_PORT_OFFSET > 65535:
        raise ValueError(f"rendezvous base port {base}: shardserve listens on base + {STORE_PORT_OFFSET}, "
                         "which must be <= 65535; set MASTER_PORT (or SHARDSERVE_PORT) lower")
    return addr, base + STORE_PORT_OFFSET


class ExternalLauncherExecutor(Executor):
    def __init__(self, config):
        super().__init__(config)
        par = config.parallel
        launched = env.launcher_rank()
        if launched is None:
            raise ValueError(
                "distributed_executor_backend='external_launcher' needs every rank started by a launcher, but "
                "none of RANK/WORLD_SIZE (torchrun), OMPI_COMM_WORLD_RANK/SIZE (Open MPI) or PMI_RANK/SIZE "
                "(MPICH) is set; run e.g. `torchrun --nproc-per-node N script.py` or `mpirun -np N python "
                "script.py`, or use distributed_executor_backend='mp'")
        self.rank, self.world_size, local_rank = launched
        if self.world_size != par.world_size:
            raise ValueError(
                f"the launcher started world_size={self.world_size} processes but tensor_parallel_size * "
                f"pipeline_parallel_size = {par.tensor_parallel_size} * {par.pipeline_parallel_size} = "
                f"{par.world_size}; launch exactly that many ranks (torchrun --nproc-per-node / mpirun -np) "
                "or change the sizes")
        local_world = env.launcher_local_world_size() or self.world_size
        self.output_rank = par.output_rank
        self.group: dist.ProcessGroup | None = None      # Gloo over the whole world: step outputs, block count
        self.store: dist.TCPStore | None = None
        addr, port, launch_id = "127.0.0.1", 0, ""
        if self.world_size > 1:
            addr, port = rendezvous_address(self.world_size, local_world)
            self.store = self._connect(addr, port)
            if self.rank == 0:
                self.store.set(_LAUNCH_ID_KEY, uuid.uuid4().hex[:12])
            launch_id = "ext-" + self.store.get(_LAUNCH_ID_KEY).decode()   # names shared-memory segments
        self.worker: Worker | None = Worker(config, DistInit(
            rank=self.rank, local_rank=local_rank, local_world_size=local_world, master_addr=addr,
            master_port=port, launch_id=launch_id, timeout_s=TIMEOUT_S))

    def _connect(self, addr: str, port: int) -> dist.TCPStore:
        """Rank 0 hosts the store (and keeps it for the life of the run); the others connect to it."""
        hint = (f"; shardserve's store uses MASTER_PORT + {STORE_PORT_OFFSET} (under mpirun without MASTER_PORT: "
                f"(SHARDSERVE_PORT or {DEFAULT_BASE_PORT}) + {STORE_PORT_OFFSET}, MASTER_ADDR default 127.0.0.1)")
        try:
            if self.rank == 0:
                return create_store(addr, port, self.world_size, TIMEOUT_S)
            return dist.TCPStore(addr, port, None, False, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        except Exception as exc:
            verb = "listen on" if self.rank == 0 else "reach rank 0's store at"
            raise ValueError(f"rank {self.rank} cannot {verb} {addr}:{port} ({exc}){hint}") from exc

    # ---- executor API -------------------------------------------------------------------------------
    def start(self) -> int:
        """As Executor.start, but the block count is an all-reduce (MIN) so every rank sizes the same cache."""
        try:
            self.collective_rpc("init_device")
            if self.world_size > 1:     # collective: every rank creates it at the same point
                self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
            self.collective_rpc("load_model")
            self.num_blocks = self._min_over_ranks(self.worker.num_available_blocks())
            if self.num_blocks < 1:
                raise ValueError("no memory left for the KV cache; set kv_cache_memory (bytes) or free memory")
            self.kv_cache_bytes = max(self.collective_rpc("init_cache", self.num_blocks))
        except BaseException as exc:
            self.failure = exc
            raise
        return self.num_blocks

    def _min_over_ranks(self, value: int) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def collective_rpc(self, method: str, *args) -> list:
        """Every rank calls this at the same point (SPMD); the list holds this rank's result only."""
        assert not self.pending, "collective_rpc while steps are in flight"
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        """Run this rank's part now (PP sends and receives happen in submission order on every rank);
        the broadcast of the result waits until the engine asks for it, so PP stages overlap."""
        if self.failure is None:
            try:
                return self._submit(self.worker.execute_model(sched))
            except Exception as exc:
                self._fail_pending(exc)
        future = Future()                       # the failure surfaces at .result(), as in the other executors
        future.set_exception(self.failure)
        return future

    def _collect(self, local: ModelRunnerOutput | None) -> ModelRunnerOutput:
        box = [local]
        if self.group is not None:
            # broadcast_object_list pickles: acceptable because the payload comes only from our own ranks,
            # connected through the launcher's private rendezvous (the same trust as the TCPStore itself).
            try:
                dist.broadcast_object_list(box, src=self.output_rank, group=self.group)
            except Exception as exc:
                error = WorkerError(f"rank {self.rank}: receiving step output from rank {self.output_rank} "
                                    f"failed (another rank died or stopped?): {exc}")
                self._fail_pending(error)
                raise error from exc
        return box[0]

    def shutdown(self) -> None:
        """Wait (briefly) for the other ranks, then destroy the process groups; safe to call twice."""
        if self.worker is None:
            return
        if self.group is not None and self.failure is None:
            try:    # keep rank 0's store alive until every rank is done with it
                dist.monitored_barrier(self.group, timeout=datetime.timedelta(seconds=60))
            except Exception:
                pass
        self.group = None
        try:
            self.worker.shutdown()          # destroys the TP/PP groups and the default process group
        finally:
            self.worker = None
            self.store = None
