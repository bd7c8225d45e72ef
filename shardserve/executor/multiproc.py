"""Multiprocessing executor: one spawned worker process per rank, on this node and on headless nodes.

The driver opens its authenticated control port first (the ranks' rendezvous store, and where headless nodes
join), spawns this node's ranks, links in every headless node's ranks (--nnodes), sends every RPC to all
ranks, and reads replies while watching each rank's sentinel (process sentinel here, heartbeat-backed
stand-in for remote ranks): a worker that dies, raises or goes silent becomes a WorkerError naming its rank
and cause, and every other worker is stopped.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import uuid
from concurrent.futures import Future
from multiprocessing.connection import wait

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.distributed import env
from shardserve.distributed.control_server import ControlServer, wait_for_agents
from shardserve.distributed.netif import interface_for_ip
from shardserve.executor.base import Executor, MainModuleReimportedError, WorkerError
from shardserve.executor.local_workers import (MAIN_REIMPORTED_EXIT, LocalWorkers, death_cause,
                                               exit_if_reimporting_main, main_guard_advice)
from shardserve.executor.node_link import NodeLink, RemoteRank
from shardserve.worker.worker import DistInit

STARTUP_TIMEOUT_S = 600.0
LIVENESS_POLL_S = 1.0           # how often a waiting driver checks its local workers' liveness beats


class MultiprocExecutor(Executor):
    def __init__(self, config):
        exit_if_reimporting_main()          # a worker re-running an unguarded script: stop before creating anything
        super().__init__(config)
        par = config.parallel
        self.server = None
        self.links: list[NodeLink] = []
        self.local: LocalWorkers | None = None
        self.world_size = par.world_size
        self.launch_id = uuid.uuid4().hex[:12]
        self.output_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size   # last stage, tp 0
        self.expected = [0] * self.world_size           # replies each rank still owes us
        self.heartbeat_timeout = env.heartbeat_timeout()
        self.procs: list = []                           # mp.Process here, RemoteRank for other nodes; rank order
        self.conns: list = []                           # reply connection per rank
        multinode = par.nnodes > 1
        if multinode:
            secret = env.launch_secret()
            if secret is None:
                raise ValueError("nnodes > 1 needs SHARDSERVE_SECRET, the same on every node (e.g. `export "
                                 "SHARDSERVE_SECRET=$(openssl rand -hex 32)` once, then on every node)")
            host, port = par.master_addr, par.master_port
        else:
            secret, host, port = os.urandom(32), env.host_ip(), env.base_port() or 0
        try:
            self.server = ControlServer(host, port, secret)
        except OSError as exc:
            flag = "--master-addr/--master-port" if multinode else "SHARDSERVE_HOST_IP/SHARDSERVE_PORT"
            raise ValueError(f"cannot listen on {host}:{port} for the control port and rendezvous ({exc}); "
                             f"set {flag} to a free port on this host's address") from exc
        per_node = par.ranks_per_node
        child_env = {"WORLD_SIZE": str(self.world_size), "MASTER_ADDR": host, "MASTER_PORT": str(self.server.port)}
        if par.device == "cuda" and "CUDA_VISIBLE_DEVICES" in os.environ:
            child_env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]

        def dist_inits(node: int, node_host: str) -> list[DistInit]:
            return [DistInit(rank=node * per_node + i, local_rank=i, local_world_size=per_node, master_addr=host,
                             master_port=self.server.port, launch_id=self.launch_id,
                             timeout_s=par.distributed_timeout_seconds, host_id=node_host if multinode else "",
                             secret=secret) for i in range(per_node)]

        try:
            local_env = dict(child_env)
            ifname = interface_for_ip(host) if multinode else None
            if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
                local_env["GLOO_SOCKET_IFNAME"] = ifname
            self.local = LocalWorkers(config, dist_inits(0, host), local_env, self.launch_id)
            self.procs = list(self.local.procs)
            self.conns = list(self.local.conns)
            if multinode:
                self._join_nodes(config, host, dist_inits, child_env)
        except BaseException:
            self._stop_workers(graceful=False)
            raise

    def _join_nodes(self, config, host: str, dist_inits, child_env: dict) -> None:
        """Wait for every headless node, check their addresses, start their ranks and link them in."""
        par = self.config.parallel
        joined = wait_for_agents(self.server, set(range(1, par.nnodes)), par.distributed_timeout_seconds)
        owner = {host: 0}
        for node in sorted(joined):
            channel, (_, node_host, _pid) = joined[node]
            if owner.setdefault(node_host, node) != node:
                error = (f"nodes {owner[node_host]} and {node} both advertise the address {node_host}; set "
                         "SHARDSERVE_HOST_IP on each node to its own reachable address")
                channel.send(("reject", error))
                raise ValueError(error)
        for node in sorted(joined):
            channel, (_, node_host, _pid) = joined[node]
            inits = dist_inits(node, node_host)
            channel.send(("start", config, inits, child_env, self.launch_id))
            channel.settimeout(par.distributed_timeout_seconds)
            reply = channel.recv()
            if reply[0] != "started":
                raise WorkerError(f"node {node} ({node_host}) failed to start its ranks: {reply[1]}")
            link = NodeLink(node, node_host, channel, [d.rank for d in inits], reply[1], self.heartbeat_timeout)
            self.links.append(link)
            self.procs.extend(link.handles)
            self.conns.extend(link.reply_conns)

    # ---- messaging ----------------------------------------------------------------------------------
    def _broadcast(self, method: str, args: tuple, repliers: list[int]) -> None:
        self._raise_if_failed()
        for rank in repliers:
            self.expected[rank] += 1
        payload = pickle.dumps((method, args))
        for link in self.links:
            link.send_command(payload)
        try:
            self.local.write(payload, alive=self._all_alive)
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
                frozen = self.local.frozen(self.heartbeat_timeout)
                if frozen:
                    r = self.local.ranks[frozen[0]]
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
        self.local.unlink_ring()       # every local rank mapped the ring before its first answer
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
        payload = pickle.dumps(("shutdown", ())) if graceful and self._all_alive() else None
        for link in self.links:
            if payload is not None:
                link.send_command(payload)
        if self.local is not None:
            self.local.stop(payload)
            self.local = None
        for link in self.links:
            link.close(graceful=payload is not None)
        self.conns = [_ClosedConn() for _ in self.conns]
        if self.server is not None:
            self.server.close()


class _ClosedConn:
    def close(self):
        pass

    def fileno(self):
        raise OSError("executor is shut down")
