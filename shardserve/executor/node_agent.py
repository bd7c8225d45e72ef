"""A headless node (`shardserve serve --headless`): joins node 0's control port, runs this node's ranks.

The agent connects with the launch secret, announces its node rank and address, receives the engine config
and its ranks' DistInit, spawns their workers, then relays: commands from node 0 into the local ring,
replies and deaths back, heartbeats both ways. It stops its workers and exits when node 0 says so, closes
the connection, or goes silent for the heartbeat timeout (a cut link): nothing is left running.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import threading
from multiprocessing.connection import wait

from shardserve.distributed import env
from shardserve.distributed.netif import interface_for_ip
from shardserve.distributed.secure_channel import AuthError, Channel, connect
from shardserve.executor.local_workers import LocalWorkers, death_cause
from shardserve.executor.node_link import send_heartbeats


def run_headless(nnodes: int, node_rank: int, master_addr: str | None, master_port: int, timeout_s: float) -> int:
    """Serve this node's ranks until node 0 ends the launch. Exit status 0 when it ended normally."""
    if nnodes < 2 or not 1 <= node_rank < nnodes:
        raise ValueError(f"--headless runs node ranks 1..nnodes-1: got --nnodes {nnodes} --node-rank {node_rank}")
    if not master_addr:
        raise ValueError("--headless needs --master-addr: node 0's address (and --master-port, default 29501)")
    secret = env.launch_secret()
    if secret is None:
        raise ValueError("--headless needs SHARDSERVE_SECRET, the same value as on node 0 "
                         "(e.g. `export SHARDSERVE_SECRET=$(openssl rand -hex 32)` once, then on every node)")
    channel, host = join(master_addr, master_port, secret, node_rank, env._get("SHARDSERVE_HOST_IP"), timeout_s)
    return serve(channel, host, master_addr, master_port, timeout_s)


def join(master_addr: str, master_port: int, secret: bytes, node_rank: int, host: str | None,
         timeout_s: float) -> tuple[Channel, str]:
    """Connect to node 0's control port and announce this node (its rank and address: `host`, else the address
    this connection leaves from). ConnectionError naming the address when node 0 cannot be reached."""
    try:
        channel = connect(master_addr, master_port, secret, timeout_s)
    except AuthError:
        raise
    except ConnectionError as exc:
        raise ConnectionError(f"no master reachable: {exc}; start node 0 first, or check --master-addr and "
                              "--master-port (and --distributed-timeout-seconds to wait longer)") from None
    host = host or channel.sock.getsockname()[0]
    channel.send(("agent", node_rank, host, os.getpid()))
    return channel, host


def serve(channel: Channel, host: str, master_addr: str, master_port: int, timeout_s: float) -> int:
    """Wait for node 0's start message, run this node's ranks until the launch ends; exit status 0 if it ended
    normally."""
    channel.settimeout(timeout_s)
    try:
        msg = channel.recv()
    except (EOFError, OSError) as exc:
        raise ConnectionError(f"node 0 at {master_addr}:{master_port} did not start this node's ranks "
                              f"({exc.__class__.__name__}); see node 0's error") from None
    if msg[0] == "reject":
        raise ValueError(f"node 0 refused this node: {msg[1]}")
    return _Agent(channel, host, *msg[1:]).run()


class _Agent:
    def __init__(self, channel: Channel, host: str, config, dist_inits, child_env: dict, launch_id: str):
        self.channel = channel
        child_env = dict(child_env)
        ifname = interface_for_ip(host)
        if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
            child_env["GLOO_SOCKET_IFNAME"] = ifname
        try:
            self.workers = LocalWorkers(config, dist_inits, child_env, launch_id)
        except Exception as exc:
            channel.send(("error", f"node at {host} could not start its workers: {exc}"))
            raise
        self.ranks = self.workers.ranks
        self.done = threading.Event()
        channel.send(("started", [p.pid for p in self.workers.procs]))

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop_from_signal())
        threading.Thread(target=self._forward_replies, daemon=True, name="shardserve-agent-replies").start()
        threading.Thread(target=send_heartbeats, args=(self.channel, self.done), daemon=True,
                         name="shardserve-agent-hb").start()
        status, why = 1, "unknown"
        self.channel.settimeout(env.heartbeat_timeout())
        try:
            while True:
                msg = self.channel.recv()
                if msg[0] == "cmd":
                    try:
                        self.workers.write(msg[1])
                    except BrokenPipeError:
                        pass            # the reply forwarder reports the dead worker
                elif msg[0] == "unlink":
                    self.workers.unlink_ring()
                elif msg[0] == "bye":
                    status, why = 0, "node 0 ended the launch"
                    break
                elif msg[0] == "kill":
                    status, why = 1, "node 0 stopped the launch after a failure"
                    break
        except socket.timeout:
            why = f"no heartbeat from node 0 for {env.heartbeat_timeout():.0f} s (link cut or node 0 down)"
        except (OSError, EOFError, AuthError) as exc:
            why = f"lost the connection to node 0 ({exc.__class__.__name__})"
        except _Stop:
            why = "stopped by a signal"
        self.done.set()
        self.workers.stop(pickle.dumps(("shutdown", ())) if status == 0 else None)
        self.channel.close()
        print(f"shardserve headless node: {why}; workers stopped", file=sys.stderr, flush=True)
        return status

    def _stop_from_signal(self) -> None:
        raise _Stop()

    def _forward_replies(self) -> None:
        procs, conns = self.workers.procs, self.workers.conns
        live = set(range(len(procs)))
        while not self.done.is_set() and live:
            ready = wait([*(conns[i] for i in live), *(procs[i].sentinel for i in live)], timeout=0.5)
            for i in self.workers.frozen(env.heartbeat_timeout()):
                if i in live:
                    live.discard(i)
                    self.channel.send(("dead", self.ranks[i], f"stopped answering: no liveness beat for "
                                                               f"{env.heartbeat_timeout():.0f} s (stopped or frozen)"))
            for i in sorted(live):
                rank = self.ranks[i]
                try:
                    if conns[i] in ready:
                        self.channel.send(("reply", rank, conns[i].recv_bytes()))
                    elif procs[i].sentinel in ready:
                        live.discard(i)
                        self.channel.send(("dead", rank, death_cause(procs[i])))
                except (EOFError, OSError):
                    live.discard(i)
                    if not self.done.is_set():
                        try:
                            self.channel.send(("dead", rank, death_cause(procs[i])))
                        except OSError:
                            return


class _Stop(Exception):
    """SIGTERM/SIGINT on a headless node: stop the workers and exit."""
