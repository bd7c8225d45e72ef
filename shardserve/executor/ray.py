"""Ray executor: one Ray actor per rank in a placement group; collectives stay on torch.distributed.

The driver joins an existing cluster (RAY_ADDRESS, or a running one via address="auto") or starts a local
Ray. Ranks are ordered driver's node first, then by node, so TP groups stay within a node where they can.
Each actor advertises its node's SHARDSERVE_HOST_IP (else Ray's node IP), sets GLOO_SOCKET_IFNAME to the
interface carrying it, and joins the rendezvous store the driver serves on its own host IP (authenticated
with a per-launch secret). Node identity (and so shared-memory TP) is that advertised IP, never a /dev/shm probe.
"""
from __future__ import annotations

import os
import uuid
from concurrent.futures import Future

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.distributed.netif import interface_for_ip
from shardserve.distributed.control_server import ControlServer
from shardserve.executor.base import Executor, WorkerError
from shardserve.worker.worker import DistInit

RAY_TIMEOUT_S = 180.0         # placement group ready, rendezvous, startup RPCs: a clear error, never a hang
RPC_TIMEOUT_S = 120.0


def advertised_ip() -> str:
    """This node's address: SHARDSERVE_HOST_IP when set, else the node IP Ray sees."""
    import ray
    return env._get("SHARDSERVE_HOST_IP") or ray.util.get_node_ip_address()


class RankActor:
    """Body of the per-rank Ray actor: wraps a Worker, built once its rank and environment are known."""

    def __init__(self) -> None:
        self.worker = None

    def node(self) -> tuple[str, str, int, list[str]]:
        import ray
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return ray.get_runtime_context().get_node_id(), advertised_ip(), os.getpid(), gpus

    def setup(self, config, dist_init: DistInit, env_vars: dict[str, str]) -> None:
        os.environ.update(env_vars)
        ifname = interface_for_ip(dist_init.host_id)      # looked up here, on the actor's own node
        if ifname and "GLOO_SOCKET_IFNAME" not in env_vars:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        from shardserve.worker.worker import Worker
        self.worker = Worker(config, dist_init)

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    def __init__(self, config):
        super().__init__(config)
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as exc:
            raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'shardserve[ray]'") from exc
        self.ray = ray
        par = config.parallel
        self.world_size = par.world_size
        self.output_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size   # last stage, tp 0
        self.actors: list = []
        self.pids: list[int] = []          # actor pids, rank order (for tests and diagnostics)
        self.pg = None
        self.started_ray = False
        self.server: ControlServer | None = None    # rendezvous store, reached with this launch's secret
        try:
            self._connect()
            self._launch(placement_group, PlacementGroupSchedulingStrategy)
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        quiet = {"logging_level": "warning", "log_to_driver": True}
        if env._get("RAY_ADDRESS"):
            ray.init(**quiet)
            return
        try:
            ray.init(address="auto", **quiet)
            return
        except ConnectionError:
            pass
        ray.init(address="local", num_cpus=max(self.world_size, os.cpu_count() or 1), include_dashboard=False,
                 **quiet)
        self.started_ray = True

    def _launch(self, placement_group, strategy_cls) -> None:
        ray, par = self.ray, self.config.parallel
        resource = "GPU" if par.device == "cuda" else "CPU"
        have = ray.cluster_resources().get(resource, 0)
        if have < self.world_size:
            raise ValueError(f"the Ray cluster has {have:g} {resource} but tensor_parallel_size * "
                             f"pipeline_parallel_size = {self.world_size} ranks need one each; add nodes "
                             "(ray start --address ...) or lower the sizes")
        self.pg = placement_group([{resource: 1}] * self.world_size, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=RAY_TIMEOUT_S)
        if not ready:
            raise ValueError(f"Ray could not place {self.world_size} ranks ({{{resource!r}: 1}} each) within "
                             f"{RAY_TIMEOUT_S:.0f} s; cluster has {ray.cluster_resources()}, free "
                             f"{ray.available_resources()}")
        actor_cls = ray.remote(RankActor)
        actors = [actor_cls.options(num_cpus=1 if resource == "CPU" else 0, num_gpus=1 if resource == "GPU" else 0,
                                    scheduling_strategy=strategy_cls(placement_group=self.pg,
                                                                     placement_group_bundle_index=i)).remote()
                  for i in range(self.world_size)]
        self.actors = actors
        nodes = self._get([a.node.remote() for a in actors], "start", RAY_TIMEOUT_S)
        # Two Ray nodes advertising one address would break rendezvous and node identity alike.
        ip_owner: dict[str, str] = {}
        for node_id, ip, _, _ in nodes:
            if ip_owner.setdefault(ip, node_id) != node_id:
                raise ValueError(f"two Ray nodes advertise the same address {ip}; set SHARDSERVE_HOST_IP to each "
                                 "node's own reachable address before `ray start` on it")
        driver_node = ray.get_runtime_context().get_node_id()
        order = sorted(range(self.world_size), key=lambda i: (nodes[i][0] != driver_node, nodes[i][1], i))
        self.actors = [actors[i] for i in order]
        nodes = [nodes[i] for i in order]
        self.pids = [n[2] for n in nodes]
        driver_ip = env._get("SHARDSERVE_HOST_IP") or ray.util.get_node_ip_address()
        secret = os.urandom(32)       # reaches the actors through Ray's own (token-authenticated) channel
        self.server = ControlServer(driver_ip, env.base_port() or 0, secret)
        launch_id = uuid.uuid4().hex[:12]
        per_node: dict[str, list[str]] = {}           # node -> GPU ids of its ranks (empty lists on the CPU)
        for node_id, _, _, gpus in nodes:
            per_node.setdefault(node_id, []).extend(gpus)
        seen: dict[str, int] = {}
        setups = []
        for rank, (actor, (node_id, ip, _, gpus)) in enumerate(zip(self.actors, nodes)):
            local_rank = seen.get(node_id, 0)
            seen[node_id] = local_rank + 1
            env_vars = {"RANK": str(rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(local_rank)}
            if gpus:      # every rank on a node sees that node's ranks' GPUs; LOCAL_RANK indexes them
                env_vars["CUDA_VISIBLE_DEVICES"] = ",".join(per_node[node_id])
                local_rank = per_node[node_id].index(gpus[0])
                env_vars["LOCAL_RANK"] = str(local_rank)
            dist_init = DistInit(rank=rank, local_rank=local_rank, local_world_size=sum(n[0] == node_id for n in nodes),
                                 master_addr=driver_ip, master_port=self.server.port, launch_id=launch_id,
                                 timeout_s=RAY_TIMEOUT_S, host_id=ip, secret=secret)
            setups.append(actor.setup.remote(self.config, dist_init, env_vars))
        self._get(setups, "setup", RAY_TIMEOUT_S)

    # ---- messaging ----------------------------------------------------------------------------------
    def _get(self, refs: list, what: str, timeout: float | None) -> list:
        """Results of refs (one per rank, rank order); the first failing rank becomes a WorkerError."""
        ray = self.ray
        index = {ref: rank for rank, ref in enumerate(refs)}
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=timeout)
            if not ready:
                ranks = sorted(index[r] for r in remaining)
                self._fail(WorkerError(f"ranks {ranks} did not finish {what} within {timeout:.0f} s"))
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                self._fail(WorkerError(f"worker rank {index[ready[0]]} (Ray actor) died during {what}: {exc}"))
            except ray.exceptions.RayTaskError as exc:
                self._fail(WorkerError(f"rank {index[ready[0]]} raised during {what}:\n{exc}"))
        return ray.get(list(refs))

    def _fail(self, error: WorkerError):
        if self.failure is None:
            self._fail_pending(error)
            self._release()
        raise self.failure

    # ---- executor API -------------------------------------------------------------------------------
    def collective_rpc(self, method: str, *args) -> list:
        assert not self.pending, "collective_rpc while steps are in flight"
        if self.failure is not None:
            raise self.failure
        timeout = RAY_TIMEOUT_S if method in ("init_device", "load_model") else RPC_TIMEOUT_S
        return self._get([a.call.remote(method, *args) for a in self.actors], method, timeout)

    def execute_model(self, sched: SchedulerOutput) -> Future[ModelRunnerOutput]:
        if self.failure is not None:
            raise self.failure
        return self._submit([a.call.remote("execute_model", sched) for a in self.actors])

    def _collect(self, refs: list) -> ModelRunnerOutput:
        return self._get(refs, "execute_model", None)[self.output_rank]

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure
        self._get([a.call.remote("check_health") for a in self.actors], "check_health", RPC_TIMEOUT_S)

    def shutdown(self) -> None:
        """Stop the workers, kill the actors, remove the placement group (and our local Ray); safe twice."""
        if self.actors and self.failure is None:
            try:
                self.ray.wait([a.call.remote("shutdown") for a in self.actors], num_returns=len(self.actors),
                              timeout=10)
            except Exception:
                pass
        self._release()

    def _release(self) -> None:
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False
