"""Ray compiled-graph executor (SHARDSERVE_RAY_COMPILED_DAG=1): each step travels one compiled Ray DAG.

Ray places one actor per rank (ray_placement) and each hosts its rank's Worker; start-up and collective_rpc are
plain actor calls. Steps go through a DAG built as vLLM's: the scheduler output enters every first-stage rank,
TP rank t of stage k feeds TP rank t of stage k+1 with (scheduler output, {"hidden_states", "residual"}) on the
DAG's channels (shared memory on a node, Ray's channels between nodes; NCCL on the GPU), and every last-stage
rank is an output (tp_rank 0's carries the sampled tokens). Up to pp executions are in flight. TP collectives
stay on torch.distributed. A rank that dies or raises is seen by Ray's DAG monitor, or by the step timeout.

Known Ray limitation (2.60; ray-project/ray#59404, #59191, #63229, open): when a rank dies while a rank on
another node still writes into the DAG, the raylet of the node reading that cross-node channel can hit a fatal
check (experimental_mutable_object_provider.cc:154, "Channel closed") and exit, losing that Ray node. The step
still fails with a WorkerError naming the dead rank and nothing of the launch is left, but the cluster needs
that node's `ray start` again (seen in about 1 of 6 kills of the driver's-node rank of tp=2 over two hosts).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from concurrent.futures import Future

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.distributed.control_server import ControlServer
from shardserve.executor.base import Executor, WorkerError
from shardserve.executor.ray_placement import RAY_TIMEOUT_S, RankActor, RayPlacement

RPC_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0         # graceful worker shutdown; then the actors are killed


class DagRankActor(RankActor):
    """RankActor plus the DAG's per-step method."""

    def stage(self, x):
        """x: the scheduler output (first stage) or (scheduler output, previous stage's hand-off). Returns
        (scheduler output, this stage's hand-off) before the last stage; on it, tp_rank 0's ModelRunnerOutput
        (None on the other TP ranks)."""
        sched, intermediate = x if isinstance(x, tuple) else (x, None)
        try:
            out = self.worker.execute_stage(sched, intermediate)
        except Exception as exc:
            raise WorkerError(f"rank {self.worker.dist_init.rank} raised during execute_model: {exc!r}") from exc
        return out if self.worker.ctx.pp.is_last else (sched, out)


class RayCompiledDagExecutor(Executor):
    def __init__(self, config):
        super().__init__(config)
        par = config.parallel
        self.tp, self.pp = par.tensor_parallel_size, par.pipeline_parallel_size
        self.step_timeout = par.distributed_timeout_seconds    # a step slower than this is a hung rank
        self.server: ControlServer | None = None    # rendezvous store, reached with this launch's secret
        self.dag = None                              # the compiled DAG, once start() has loaded the model
        self.placement = RayPlacement(config, actor_body=DagRankActor)
        self.ray = self.placement.ray
        try:
            self._setup()
        except BaseException:
            self._release()
            raise

    @property
    def actors(self) -> list:
        return self.placement.actors

    @property
    def pids(self) -> list[int]:
        return self.placement.pids

    @property
    def started_ray(self) -> bool:
        return self.placement.started_ray

    # ---- start-up -----------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Serve the rendezvous on the driver's address and build each actor's Worker."""
        placement = self.placement
        secret = os.urandom(32)       # reaches the actors through Ray's own (token-authenticated) channel
        self.server = ControlServer(placement.driver_ip, env.base_port() or 0, secret)
        inits = placement.dist_inits(self.server.port, secret, uuid.uuid4().hex[:12], RAY_TIMEOUT_S)
        setups = []
        for node in placement.nodes:
            for rank in node.ranks:
                env_vars = {"RANK": str(rank), "WORLD_SIZE": str(len(inits)),
                            "LOCAL_RANK": str(inits[rank].local_rank), **placement.node_env(node)}
                setups.append(placement.actors[rank].setup.remote(self.config, inits[rank], env_vars))
        placement.get(setups, "setup", RAY_TIMEOUT_S)

    def start(self) -> int:
        num_blocks = super().start()
        self.dag = self._compile()
        return num_blocks

    def _compile(self):
        """The step DAG: input -> stage 0 (every TP rank) -> ... -> stage pp-1, whose ranks are the outputs."""
        from ray.dag import InputNode, MultiOutputNode
        gpu = self.config.parallel.device == "cuda"
        with InputNode() as sched:
            outs = [sched] * self.tp                                   # what TP rank t of the next stage reads
            for k in range(self.pp):
                outs = [self.actors[k * self.tp + t].stage.bind(outs[t]) for t in range(self.tp)]
                if gpu and k < self.pp - 1:
                    outs = [o.with_tensor_transport(transport="nccl") for o in outs]
            dag = MultiOutputNode(outs)
        # a submission waits while stage 0 is busy: as long as a step may take, not Ray's default 10 s
        return dag.experimental_compile(_max_inflight_executions=self.pp, _submit_timeout=self.step_timeout)

    # ---- executor API -------------------------------------------------------------------------------
    def collective_rpc(self, method: str, *args) -> list:
        assert not self.pending, "collective_rpc while steps are in flight"
        if self.failure is not None:
            raise self.failure
        timeout = RAY_TIMEOUT_S if method in ("init_device", "load_model") else RPC_TIMEOUT_S
        return self.placement.get([a.call.remote(method, *args) for a in self.actors], method, timeout,
                                  on_error=self._fail)

    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        if self.failure is not None:
            raise self.failure
        try:
            refs = self.dag.execute(sched)          # one CompiledDAGRef per last-stage TP rank
        except Exception as exc:
            self._fail(self._step_error(exc))
        return self._submit(refs)

    def _collect(self, refs: list) -> ModelRunnerOutput:
        ray = self.ray
        try:
            out = ray.get(refs[0], timeout=self.step_timeout)
            for ref in refs[1:]:                    # the other TP ranks' None, read so their buffers are freed
                ray.get(ref, timeout=self.step_timeout)
        except Exception as exc:
            self._fail(self._step_error(exc))
        return out

    def _step_error(self, exc: BaseException) -> WorkerError:
        """A failed step as a WorkerError naming the dead rank(s) where Ray knows them."""
        dead = self._dead_ranks()
        if dead:
            return WorkerError(f"rank {', '.join(map(str, dead))} (Ray actor) died during execute_model: {exc}")
        if isinstance(exc, self.ray.exceptions.RayChannelTimeoutError):
            return WorkerError(f"a rank did not finish execute_model within {self.step_timeout:.0f} s: {exc}")
        return WorkerError(f"execute_model failed in the Ray compiled graph: {exc}")

    def _dead_ranks(self) -> list[int]:
        """Ranks whose actor Ray reports dead (each checked with a short ping)."""
        ray = self.ray
        pings = [a.node.remote() for a in self.actors]
        ray.wait(pings, num_returns=len(pings), timeout=2.0)
        dead = []
        for rank, ping in enumerate(pings):
            try:
                ray.get(ping, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(rank)
            except Exception:
                pass
        return dead

    def _fail(self, error: WorkerError):
        """Record the failure, fail the steps in flight, release everything, raise."""
        if self.failure is None:
            self._fail_pending(error)
            self._release()
        raise self.failure

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure
        if not self.pending:              # with steps in flight, their results report a failure
            self.collective_rpc("check_health")

    def shutdown(self) -> None:
        """Stop the workers (beside the DAG's idle loops), tear down the DAG, kill the actors, remove the
        placement group (and our Ray); safe twice."""
        if self.actors and self.failure is None and not self.pending:
            with contextlib.suppress(Exception):
                self.ray.wait([a.call.remote("shutdown") for a in self.actors], num_returns=len(self.actors),
                              timeout=STOP_TIMEOUT_S)
        if self.dag is not None:
            self._teardown_dag()
        self._release()

    def _teardown_dag(self) -> None:
        """Stop the actors' DAG loops; any still running after Ray's teardown timeout is killed."""
        dag, self.dag = self.dag, None
        with contextlib.suppress(Exception):
            dag.teardown(kill_actors=True)

    def _release(self) -> None:
        if self.dag is not None:
            for actor in self.actors:      # killed first, so tearing down a DAG whose ranks hang cannot wait
                with contextlib.suppress(Exception):
                    self.ray.kill(actor, no_restart=True)
            self._teardown_dag()
        self.placement.release()
        if self.server is not None:
            self.server.close()
            self.server = None
