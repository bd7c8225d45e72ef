"""The driver's control port: one authenticated listener serving the rendezvous store and headless nodes.

Every connection first passes the secure_channel handshake on the launch secret, then says what it is:
("store",) -> a torch.distributed store client (SecureStore, the ranks' rendezvous instead of an open
TCPStore); ("agent", node_rank, host_ip, pid) -> a headless node, handed to the executor via `agents`;
("replies", rank) -> a rank on another node that answers the driver directly, handed over via `ranks`.
"""
from __future__ import annotations

import datetime
import queue
import socket
import threading
import time

import torch.distributed as dist

from shardserve.distributed.secure_channel import AuthError, Channel, accept_handshake, connect


class _StoreState:
    """The key-value table behind the store, with TCPStore's semantics for each operation."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def handle(self, op: str, args: tuple):
        """(status, value): status "ok", or "timeout" with a message."""
        with self.cond:
            if op == "set":
                key, value = args
                self.data[key] = value
                self.cond.notify_all()
                return "ok", None
            if op == "get":
                key, timeout = args
                if not self.cond.wait_for(lambda: key in self.data, timeout):
                    return "timeout", f"key {key!r} not set within {timeout:.0f} s"
                return "ok", self.data[key]
            if op == "add":
                key, amount = args
                value = int(self.data.get(key, b"0")) + amount
                self.data[key] = str(value).encode()
                self.cond.notify_all()
                return "ok", value
            if op == "append":
                key, value = args
                self.data[key] = self.data.get(key, b"") + value
                self.cond.notify_all()
                return "ok", None
            if op == "compare_set":
                key, expected, desired = args
                current = self.data.get(key)
                if (current is None and expected == b"") or current == expected:
                    self.data[key] = desired
                    self.cond.notify_all()
                    return "ok", desired
                return "ok", expected if current is None else current
            if op == "wait":
                keys, timeout = args
                if not self.cond.wait_for(lambda: all(k in self.data for k in keys), timeout):
                    return "timeout", f"keys {keys} not set within {timeout:.0f} s"
                return "ok", None
            if op == "check":
                return "ok", all(k in self.data for k in args[0])
            if op == "delete_key":
                return "ok", self.data.pop(args[0], None) is not None
            if op == "num_keys":
                return "ok", len(self.data)
        return "error", f"unknown store operation {op!r}"


class ControlServer:
    """Listens on host:port (port 0 picks a free one: read `port`); serves until close()."""

    def __init__(self, host: str, port: int, secret: bytes):
        self.secret = secret
        self.sock = socket.create_server((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.store = _StoreState()
        self.agents: queue.Queue[tuple[Channel, tuple]] = queue.Queue()
        self.ranks: queue.Queue[tuple[Channel, int]] = queue.Queue()     # ranks answering the driver directly
        self.rejected = 0                   # connections refused for a wrong secret (named in join errors)
        self.closed = False
        self.channels: list[Channel] = []
        threading.Thread(target=self._accept_loop, daemon=True, name="shardserve-control").start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="shardserve-control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            channel = accept_handshake(conn, self.secret)
            hello = channel.recv()
        except AuthError:
            self.rejected += 1
            conn.close()
            return
        except (OSError, EOFError):
            conn.close()
            return
        self.channels.append(channel)
        if hello == ("store",):
            self._serve_store(channel)
        elif isinstance(hello, tuple) and hello and hello[0] == "agent":
            self.agents.put((channel, hello[1:]))
        elif isinstance(hello, tuple) and len(hello) == 2 and hello[0] == "replies":
            self.ranks.put((channel, hello[1]))
        else:
            channel.close()

    def _serve_store(self, channel: Channel) -> None:
        try:
            while not self.closed:
                op, args = channel.recv()
                channel.send(self.store.handle(op, args))
        except (OSError, EOFError, AuthError, ValueError):
            channel.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # wakes the accept() thread; close() alone would not
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        for channel in self.channels:
            channel.close()


class SecureStore(dist.Store):
    """A torch.distributed Store whose server is the driver's ControlServer, reached with the launch secret."""

    def __init__(self, host: str, port: int, secret: bytes, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.channel = connect(host, port, secret, timeout_s)
        self.channel.send(("store",))

    def _call(self, op: str, *args):
        with self.lock:
            self.channel.send((op, args))
            status, value = self.channel.recv()
        if status != "ok":
            raise RuntimeError(f"rendezvous store: {value}")
        return value

    @staticmethod
    def _bytes(value) -> bytes:
        return value if isinstance(value, bytes) else bytes(value) if not isinstance(value, str) else value.encode()

    def set(self, key: str, value) -> None:
        self._call("set", key, self._bytes(value))

    def get(self, key: str) -> bytes:
        return self._call("get", key, self.timeout_s)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, amount)

    def append(self, key: str, value) -> None:
        self._call("append", key, self._bytes(value))

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._call("compare_set", key, self._bytes(expected), self._bytes(desired))

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = self.timeout_s if timeout is None else timeout.total_seconds()
        self._call("wait", list(keys), seconds)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", list(keys))

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)

    def num_keys(self) -> int:
        return self._call("num_keys")

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self.timeout_s = timeout.total_seconds()

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys: list[str], values: list) -> None:
        for k, v in zip(keys, values):
            self.set(k, v)

    def close(self) -> None:
        self.channel.close()


def wait_for_agents(server: ControlServer, expected: set[int], timeout_s: float) -> dict[int, tuple[Channel, tuple]]:
    """node_rank -> (channel, hello) for every expected headless node; ValueError naming the missing ones."""
    deadline = time.monotonic() + timeout_s
    joined: dict[int, tuple[Channel, tuple]] = {}
    while set(joined) != expected:
        remaining = deadline - time.monotonic()
        try:
            channel, hello = server.agents.get(timeout=max(0.0, remaining))
        except queue.Empty:
            missing = sorted(expected - set(joined))
            refused = (f"; {server.rejected} connection(s) were refused for a wrong secret (set the same "
                       "SHARDSERVE_SECRET on every node)" if server.rejected else "")
            raise ValueError(
                f"node(s) {missing} did not join {server.host}:{server.port} within {timeout_s:.0f} s "
                f"(--distributed-timeout-seconds); on each, run `shardserve serve --headless --nnodes N "
                f"--node-rank R --master-addr {server.host} --master-port {server.port}`{refused}") from None
        node_rank = hello[0]
        if node_rank not in expected or node_rank in joined:
            channel.send(("reject", f"node rank {node_rank} is not expected (or joined twice); expected "
                                    f"{sorted(expected)}"))
            channel.close()
            continue
        joined[node_rank] = (channel, hello)
    return joined
