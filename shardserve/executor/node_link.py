"""The driver's end of one headless node: commands out, replies into per-rank pipes, heartbeats both ways.

Messages on the authenticated channel, driver -> node: ("start", config, dist_inits, env, launch_id),
("cmd", pickled command), ("unlink",) once every rank has mapped the node's command ring, ("hb",), ("bye",)
after a graceful shutdown command, ("kill",).
Node -> driver: ("started", pids) or ("error", text), ("reply", rank, pickled reply), ("dead", rank, cause),
("hb",). A node silent for `heartbeat_timeout` seconds is lost: each of its ranks reads as dead with that cause.
"""
from __future__ import annotations

import socket
import threading
from multiprocessing import Pipe

from shardserve.distributed.secure_channel import AuthError, Channel

HEARTBEAT_INTERVAL_S = 1.0


def send_heartbeats(channel: Channel, stop: threading.Event) -> None:
    """Send ("hb",) every HEARTBEAT_INTERVAL_S until `stop` is set or the connection fails (both ends run this)."""
    while not stop.wait(HEARTBEAT_INTERVAL_S):
        try:
            channel.send(("hb",))
        except OSError:
            return


class RemoteRank:
    """Stands in for a worker process on another node, with the surface the executor uses of mp.Process."""

    def __init__(self, rank: int, node: int, host: str, pid: int):
        self.rank, self.node, self.host, self.pid = rank, node, host, pid
        self.cause: str | None = None
        self._dead_r, self._dead_w = Pipe(duplex=False)
        self.sentinel = self._dead_r          # readable once the rank is known dead

    def is_alive(self) -> bool:
        return self.cause is None

    def mark_dead(self, cause: str) -> None:
        if self.cause is None:
            self.cause = cause
            self._dead_w.send_bytes(b"dead")

    def describe_death(self) -> str:
        cause = self.cause or "closed its connection to the driver"
        return f"worker rank {self.rank} on node {self.node} ({self.host}, pid {self.pid}) {cause}"


class NodeLink:
    def __init__(self, node: int, host: str, channel: Channel, ranks: list[int], pids: list[int],
                 heartbeat_timeout: float, agent_pid: int):
        self.node, self.host, self.channel, self.agent_pid = node, host, channel, agent_pid
        self.heartbeat_timeout = heartbeat_timeout
        self.handles = [RemoteRank(r, node, host, pid) for r, pid in zip(ranks, pids)]
        self.by_rank = {h.rank: h for h in self.handles}
        pipes = [Pipe(duplex=False) for _ in ranks]
        self.reply_conns = [r for r, _ in pipes]          # the executor reads replies here, one per rank
        self._reply_w = {rank: w for rank, (_, w) in zip(ranks, pipes)}
        self.closed = threading.Event()
        self.ring_unlinked = False
        self.direct = None          # the node's one rank's own connection, when it takes its commands there
        threading.Thread(target=self._receive, daemon=True, name=f"shardserve-node{node}-rx").start()
        threading.Thread(target=send_heartbeats, args=(channel, self.closed), daemon=True,
                         name=f"shardserve-node{node}-hb").start()

    def send_command(self, payload: bytes) -> None:
        if self.direct is None:
            self.send("cmd", payload)
            return
        try:
            self.direct.send_bytes(payload)
        except OSError:
            pass            # the rank is gone: its agent's report, or its connection's end, tells the executor

    def unlink_ring(self) -> None:
        """Once: every rank of the node has mapped its command ring, so the agent may drop its name."""
        if not self.ring_unlinked:
            self.ring_unlinked = True
            self.send("unlink")

    def send(self, *msg) -> None:
        try:
            self.channel.send(msg)
        except OSError as exc:
            self._lost(f"could not be sent a command ({exc})")

    def _receive(self) -> None:
        self.channel.settimeout(self.heartbeat_timeout)
        try:
            while not self.closed.is_set():
                msg = self.channel.recv()
                if msg[0] == "reply":
                    self._reply_w[msg[1]].send_bytes(msg[2])
                elif msg[0] == "dead":
                    self.by_rank[msg[1]].mark_dead(msg[2])
        except socket.timeout:
            self._lost(f"sent no heartbeat for {self.heartbeat_timeout:.0f} s (network link cut, host down or frozen)")
        except AuthError as exc:
            self._lost(f"sent a message that failed authentication ({exc})")
        except (OSError, EOFError) as exc:
            self._lost(f"closed its connection ({exc.__class__.__name__}: the node's agent exited or the link failed)")

    def _lost(self, cause: str) -> None:
        if not self.closed.is_set():
            for handle in self.handles:
                handle.mark_dead(f"is unreachable: node {self.node} ({self.host}) {cause}")

    def close(self, graceful: bool) -> None:
        """Tell the node to finish (graceful) or kill its workers, then drop the connection."""
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.channel.send(("bye",) if graceful else ("kill",))
        except OSError:
            pass
        self.channel.close()
