"""Ray places the ranks: one placement-group bundle and one RankActor per rank, grouped into nodes.

The driver joins an existing cluster (RAY_ADDRESS, or a running one via address="auto") or starts a local
Ray. Ranks are ordered driver's node first, then by node address, so TP groups stay within a node where they
can. Each node advertises its SHARDSERVE_HOST_IP (else Ray's node IP); node identity (and so shared-memory TP)
is that address, never a /dev/shm probe. What runs the ranks is the executor's choice: the default Ray
executor has the first actor of each remote node start a node agent (steps then travel as with --nnodes);
the compiled-graph executor hosts a Worker in every actor.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

from shardserve.distributed import env
from shardserve.distributed.netif import interface_for_ip
from shardserve.worker.worker import DistInit

logger = logging.getLogger(__name__)

RAY_TIMEOUT_S = 180.0         # placement group ready, rendezvous, startup RPCs: a clear error, never a hang


def advertised_ip() -> str:
    """This node's address: SHARDSERVE_HOST_IP when set, else the node IP Ray sees."""
    import ray
    return env._get("SHARDSERVE_HOST_IP") or ray.util.get_node_ip_address()


def normal_priority() -> None:
    """Ray starts its worker processes at nice 15 (its worker_niceness): put this process, and the children it
    starts later, back at nice 0. That needs CAP_SYS_NICE or a high enough RLIMIT_NICE; without them the ranks
    keep Ray's nice 15, and a warning says how to avoid it."""
    if os.getpriority(os.PRIO_PROCESS, 0) <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        print(f"shardserve: this node's ranks run at nice {os.getpriority(os.PRIO_PROCESS, 0)}, as Ray started "
              "them (any busy process on the node preempts them); start Ray with RAY_worker_niceness=0 in the "
              "environment of `ray start` to run them at normal priority", file=sys.stderr, flush=True)


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'shardserve[ray]'") from exc
    return ray


class RankActor:
    """Body of the per-rank Ray actor. It holds its rank's placement-group bundle (and GPU), and either hosts
    that rank's Worker (setup/call) or, as the first rank of a remote node, starts the node's agent."""

    def __init__(self) -> None:
        self.worker = None
        self.agent = None                 # this node's agent process (subprocess.Popen), if this actor runs it

    def node(self) -> tuple[str, str, int, list[str]]:
        import ray
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return ray.get_runtime_context().get_node_id(), advertised_ip(), os.getpid(), gpus

    def setup(self, config, dist_init: DistInit, env_vars: dict[str, str]) -> None:
        os.environ.update(env_vars)
        normal_priority()
        ifname = interface_for_ip(dist_init.host_id)      # looked up here, on the actor's own node
        if ifname and "GLOO_SOCKET_IFNAME" not in env_vars:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        from shardserve.worker.worker import Worker
        self.worker = Worker(config, dist_init)

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)

    def start_agent(self, master_addr: str, master_port: int, secret: bytes, node_rank: int, host: str,
                    timeout_s: float) -> int:
        """Start this node's agent process (ray_agent_process), which joins the driver's control port as node
        `node_rank` and runs the node's ranks as a headless node does; returns its pid once it has joined. An
        error names the address this node could not reach. The agent and its workers die with this actor."""
        self.agent = subprocess.Popen([sys.executable, "-m", "shardserve.executor.ray_agent_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.agent.stdin.write(pickle.dumps((master_addr, master_port, secret, node_rank, host, timeout_s)))
        self.agent.stdin.close()
        line = self.agent.stdout.readline().decode(errors="replace").strip()
        if line != "joined":
            self.agent.kill()
            self.agent.wait()
            raise ConnectionError(
                f"the Ray node at {host} could not join the driver's control port {master_addr}:{master_port} "
                f"({line.removeprefix('error ') or 'its agent exited'}); set SHARDSERVE_HOST_IP on the driver to an "
                "address every node can reach, and SHARDSERVE_PORT to a port its firewall opens")
        return self.agent.pid


@dataclass
class PlacedNode:
    """One Ray node holding ranks of this launch (the driver's node may hold none)."""
    node_id: str
    ip: str
    ranks: list[int] = field(default_factory=list)       # global ranks, ascending and contiguous
    gpus: list[str] = field(default_factory=list)        # GPU ids of those ranks, rank order (empty on the CPU)


class RayPlacement:
    """Connects to Ray, reserves one bundle per rank and places a RankActor in each; release() undoes it all."""

    def __init__(self, config, actor_body: type = RankActor):
        self.ray = import_ray()
        self.config = config
        self.actor_body = actor_body       # the actor class's body: RankActor or a subclass
        self.world_size = config.parallel.world_size
        self.actors: list = []            # rank order
        self.pids: list[int] = []         # actor pids, rank order
        self.nodes: list[PlacedNode] = []  # driver's node first, then by address
        self.pg = None
        self.started_ray = False
        try:
            self._connect()
            self._place()
        except BaseException:
            self.release()
            raise

    @property
    def driver_ip(self) -> str:
        return env._get("SHARDSERVE_HOST_IP") or self.ray.util.get_node_ip_address()

    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        quiet = {"logging_level": "warning", "log_to_driver": True}
        address = env._get("RAY_ADDRESS")
        advice = ("if it uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's "
                  "token here (the same on every node)")
        try:
            ray.init(address=address or "auto", **quiet)
            return
        except ConnectionError as exc:
            if address:
                raise ConnectionError(f"cannot join the Ray cluster at RAY_ADDRESS={address} ({exc}); {advice}, "
                                      "else check that `ray start --head` runs there") from None
            if "Could not find any running Ray instance" not in str(exc):
                logger.warning("could not join the Ray cluster this machine last started (%s); %s. Starting a "
                               "local Ray instead", exc, advice)
        ray.init(address="local", num_cpus=max(self.world_size, os.cpu_count() or 1), include_dashboard=False,
                 **quiet)
        self.started_ray = True

    def _place(self) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
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
        actor_cls = ray.remote(self.actor_body)
        actors = [actor_cls.options(num_cpus=1 if resource == "CPU" else 0, num_gpus=1 if resource == "GPU" else 0,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        placement_group=self.pg, placement_group_bundle_index=i)).remote()
                  for i in range(self.world_size)]
        self.actors = actors
        infos = self.get([a.node.remote() for a in actors], "start", RAY_TIMEOUT_S)
        # Two Ray nodes advertising one address would break rendezvous and node identity alike.
        ip_owner: dict[str, str] = {}
        for node_id, ip, _, _ in infos:
            if ip_owner.setdefault(ip, node_id) != node_id:
                raise ValueError(f"two Ray nodes advertise the same address {ip}; set SHARDSERVE_HOST_IP to each "
                                 "node's own reachable address before `ray start` on it")
        driver_node = ray.get_runtime_context().get_node_id()
        order = sorted(range(self.world_size), key=lambda i: (infos[i][0] != driver_node, infos[i][1], i))
        self.actors = [actors[i] for i in order]
        infos = [infos[i] for i in order]
        self.pids = [info[2] for info in infos]
        nodes = {driver_node: PlacedNode(driver_node, self.driver_ip)}
        for rank, (node_id, ip, _, gpus) in enumerate(infos):
            node = nodes.setdefault(node_id, PlacedNode(node_id, ip))
            node.ranks.append(rank)
            node.gpus.extend(gpus)
        self.nodes = list(nodes.values())

    def dist_inits(self, master_port: int, secret: bytes, launch_id: str, timeout_s: float) -> list[DistInit]:
        """Each rank's rendezvous and node identity, rank order (the control port is on the driver's address)."""
        out = []
        for node in self.nodes:
            for local_rank, rank in enumerate(node.ranks):
                out.append(DistInit(rank=rank, local_rank=local_rank, local_world_size=len(node.ranks),
                                    master_addr=self.driver_ip, master_port=master_port, launch_id=launch_id,
                                    timeout_s=timeout_s, host_id=node.ip, secret=secret))
        return out

    @staticmethod
    def node_env(node: PlacedNode) -> dict[str, str]:
        """Environment every rank of `node` shares: its ranks' GPUs, so LOCAL_RANK indexes them."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(node.gpus)} if node.gpus else {}

    def get(self, refs: list, what: str, timeout: float | None, on_error=None, labels: list[str] | None = None) -> list:
        """Results of refs (one per rank, rank order, unless labels name them); the first failure raises a
        WorkerError (through on_error(error) when given, so the caller can fail its pending steps first)."""
        from shardserve.executor.base import WorkerError
        ray = self.ray
        labels = labels or [f"rank {r}" for r in range(len(refs))]
        index = {ref: labels[i] for i, ref in enumerate(refs)}
        remaining = list(refs)

        def fail(error):
            if on_error is not None:
                on_error(error)
            raise error

        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=timeout)
            if not ready:
                late = ", ".join(index[r] for r in remaining)
                fail(WorkerError(f"{late} did not finish {what} within {timeout:.0f} s"))
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                fail(WorkerError(f"{index[ready[0]]} (Ray actor) died during {what}: {exc}"))
            except ray.exceptions.RayTaskError as exc:
                fail(WorkerError(f"{index[ready[0]]} raised during {what}:\n{exc}"))
        return ray.get(list(refs))

    def release(self) -> None:
        """Kill the actors (and whatever they started), remove the placement group, stop our local Ray."""
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
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False
