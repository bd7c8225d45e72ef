"""One launch's processes: the control port, this node's workers, and a link to each other node's agent.

`mp_launch` starts what the mp executor runs (this node, plus `serve --headless` nodes with --nnodes);
the Ray executor builds the same Launch from Ray's placement. Either way the executor then sees one list of
rank handles and reply connections in rank order, and `stop` releases everything the launch created.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import time
import uuid
from typing import Callable

from shardserve.distributed import env
from shardserve.distributed.control_server import ControlServer, wait_for_agents
from shardserve.distributed.netif import interface_for_ip
from shardserve.executor.base import WorkerError
from shardserve.executor.local_workers import LocalWorkers
from shardserve.executor.node_link import NodeLink
from shardserve.worker.worker import DistInit

# What a remote node is sent when it joins: node index, its announced address -> its ranks' DistInit and env.
NodePlan = Callable[[int, str], tuple[list[DistInit], dict[str, str]]]


class Launch:
    """procs[r] / conns[r]: rank r's handle (mp.Process here, RemoteRank elsewhere) and reply connection."""

    def __init__(self, host: str, port: int, secret: bytes, listen_hint: str):
        self.secret = secret
        self.launch_id = uuid.uuid4().hex[:12]
        self.local: LocalWorkers | None = None
        self.links: list[NodeLink] = []
        self.procs: list = []
        self.conns: list = []
        try:
            self.server = ControlServer(host, port, secret)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port} for the control port and rendezvous ({exc}); "
                             f"set {listen_hint} to a free port on this host's address") from exc

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def base_env(self, world_size: int) -> dict[str, str]:
        """Environment every rank of every node gets."""
        return {"WORLD_SIZE": str(world_size), "MASTER_ADDR": self.host, "MASTER_PORT": str(self.port)}

    def start_local(self, config, dist_inits: list[DistInit], child_env: dict[str, str], multinode: bool) -> None:
        """Spawn this node's ranks (none: the driver's node holds no rank)."""
        if not dist_inits:
            return
        child_env = dict(child_env)
        ifname = interface_for_ip(self.host) if multinode else None
        if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
            child_env["GLOO_SOCKET_IFNAME"] = ifname
        self.local = LocalWorkers(config, dist_inits, child_env, self.launch_id)
        self.procs.extend(self.local.procs)
        self.conns.extend(self.local.conns)

    def join_nodes(self, config, nodes: set[int], plan: NodePlan, heartbeat_timeout: float, timeout_s: float,
                   output_rank: int) -> None:
        """Wait for every other node's agent, check their addresses, start their ranks and link them in
        (in node order: ranks are numbered node by node). The output rank, if it is on another node, answers
        on its own connection to the control port (its replies skip the agent's relay); the one rank of a node
        holding a single rank also takes its commands there (no relay at all)."""
        joined = wait_for_agents(self.server, nodes, timeout_s)
        owner = {self.host: 0}
        for node in sorted(joined):
            channel, (_, node_host, _pid) = joined[node]
            if owner.setdefault(node_host, node) != node:
                error = (f"nodes {owner[node_host]} and {node} both advertise the address {node_host}; set "
                         "SHARDSERVE_HOST_IP on each node to its own reachable address")
                channel.send(("reject", error))
                raise ValueError(error)
        direct: dict[int, NodeLink] = {}      # remote ranks on their own connection -> their node's link
        for node in sorted(joined):
            channel, (_, node_host, agent_pid) = joined[node]
            inits, node_env = plan(node, node_host)
            alone = len(inits) == 1
            inits = [dataclasses.replace(d, reply_to_driver=d.rank == output_rank or alone, commands_from_driver=alone)
                     for d in inits]
            channel.send(("start", config, inits, node_env, self.launch_id))
            channel.settimeout(timeout_s)
            reply = channel.recv()
            if reply[0] != "started":
                raise WorkerError(f"node {node} ({node_host}) failed to start its ranks: {reply[1]}")
            link = NodeLink(node, node_host, channel, [d.rank for d in inits], reply[1], heartbeat_timeout, agent_pid)
            self.links.append(link)
            self.procs.extend(link.handles)
            self.conns.extend(link.reply_conns)
            direct.update((d.rank, link) for d in inits if d.reply_to_driver)
        for rank, channel in self._direct_channels(set(direct), timeout_s).items():
            self.conns[rank] = channel
            if len(direct[rank].by_rank) == 1:
                direct[rank].direct = channel

    def _direct_channels(self, ranks: set[int], timeout_s: float) -> dict:
        """rank -> the connection on which that remote rank answers, once its worker has opened it."""
        deadline = time.monotonic() + timeout_s
        got: dict = {}
        while set(got) != ranks:
            try:
                channel, rank = self.server.ranks.get(timeout=0.2)
            except queue.Empty:
                for rank in sorted(ranks - set(got)):
                    proc = self.procs[rank]
                    if not proc.is_alive():
                        raise WorkerError(proc.describe_death()) from None
                    if time.monotonic() > deadline:
                        raise WorkerError(f"rank {rank} on {proc.host} did not connect to the driver's control port "
                                          f"{self.host}:{self.port} within {timeout_s:.0f} s") from None
                continue
            if rank in ranks and rank not in got:
                got[rank] = channel
            else:
                channel.close()
        return got

    def send(self, payload: bytes, alive) -> None:
        """One command to every rank: once per remote node (to its agent, or to its one rank's own connection),
        once into this node's ring."""
        for link in self.links:
            link.send_command(payload)
        if self.local is not None:
            self.local.write(payload, alive=alive)

    def frozen(self, timeout_s: float) -> list[int]:
        """Ranks here whose liveness beat is older than timeout_s."""
        return [] if self.local is None else [self.local.ranks[i] for i in self.local.frozen(timeout_s)]

    def unlink_ring(self) -> None:
        """Every rank has mapped its node's command ring (they all answered): drop the rings' /dev/shm names."""
        if self.local is not None:
            self.local.unlink_ring()
        for link in self.links:
            link.unlink_ring()

    def stop(self, graceful: bool) -> None:
        """Ask every rank to finish (graceful) or kill them, drop the links, close the control port; safe twice."""
        payload = pickle.dumps(("shutdown", ())) if graceful else None
        for link in self.links:
            if payload is not None:
                link.send_command(payload)
        if self.local is not None:
            self.local.stop(payload)
            self.local = None
        for link in self.links:
            link.close(graceful=payload is not None)
        self.server.close()


def mp_launch(config) -> Launch:
    """The mp executor's launch: this node's ranks, plus each `serve --headless` node's with --nnodes."""
    par = config.parallel
    multinode = par.nnodes > 1
    if multinode:
        secret = env.launch_secret()
        if secret is None:
            raise ValueError("nnodes > 1 needs SHARDSERVE_SECRET, the same on every node (e.g. `export "
                             "SHARDSERVE_SECRET=$(openssl rand -hex 32)` once, then on every node)")
        host, port, hint = par.master_addr, par.master_port, "--master-addr/--master-port"
    else:
        secret, host, port, hint = os.urandom(32), env.host_ip(), env.base_port() or 0, \
            "SHARDSERVE_HOST_IP/SHARDSERVE_PORT"
    launch = Launch(host, port, secret, hint)
    try:
        per_node = par.ranks_per_node
        child_env = launch.base_env(par.world_size)
        if par.device == "cuda" and "CUDA_VISIBLE_DEVICES" in os.environ:
            child_env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]

        def plan(node: int, node_host: str) -> tuple[list[DistInit], dict[str, str]]:
            inits = [DistInit(rank=node * per_node + i, local_rank=i, local_world_size=per_node, master_addr=host,
                              master_port=launch.port, launch_id=launch.launch_id,
                              timeout_s=par.distributed_timeout_seconds, host_id=node_host if multinode else "",
                              secret=secret) for i in range(per_node)]
            return inits, child_env

        launch.start_local(config, plan(0, host)[0], child_env, multinode)
        if multinode:
            launch.join_nodes(config, set(range(1, par.nnodes)), plan, env.heartbeat_timeout(),
                              par.distributed_timeout_seconds, par.output_rank)
    except BaseException:
        launch.stop(graceful=False)
        raise
    return launch
