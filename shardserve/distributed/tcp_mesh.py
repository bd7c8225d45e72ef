"""Persistent, authenticated TCP connections between the members of one group, and the full-duplex exchange
of raw byte buffers over them (the transport under tcp_collectives.py).

Setup, once per group: every member listens on its address, publishes "ip:port" in the store, connects to every
lower-numbered member and accepts every higher-numbered one (in a thread, so no order of arrival can stall).
Each connection passes secure_channel's mutual challenge-response on the launch secret, then the connector
names itself in an authenticated frame (mesh name, its index) and the listener acknowledges; an unauthenticated
or misdirected peer is refused before any tensor byte moves. A member that cannot connect posts its error in
the store, so every member fails with the same message (naming the member, address and port) within the
distributed timeout. Sockets: TCP_NODELAY, blocking, every receive and send bounded by the timeout
(SO_RCVTIMEO / SO_SNDTIMEO: no extra poll per call).

Data frames carry no MAC (like Gloo's): a 16-byte header (call number, payload bytes), checked on receipt, then
the payload straight from / into tensor memory. A peer that goes away (EOF, reset) raises at once, naming it.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from shardserve.distributed.secure_channel import AuthError, accept_handshake, client_handshake

HEADER = struct.Struct("<QQ")          # (call number, payload bytes)
_TIMEVAL = struct.Struct("@ll")
_STORE_POLL_S = 0.25                   # how often a member waiting for peers looks for another member's error


class PeerLost(ConnectionError):
    """A member of the group went away (its process exited, or the connection broke)."""


@dataclass
class Peer:
    """One other member: who it is, where it listens, and the connection to it."""
    index: int
    host: str
    port: int
    node: str = ""                     # the node it runs on, for errors
    sock: socket.socket | None = None

    def __str__(self) -> str:
        return (f"node {self.node}, " if self.node and self.node != self.host else "") + f"{self.host}:{self.port}"


class TcpMesh:
    """Connections from member `index` to every other of `size` members. `labels[i]` names member i in errors
    (e.g. "rank 3"); every member passes the same `name` (unique per group and launch) and `node` names this
    member's node."""

    def __init__(self, index: int, size: int, store: dist.Store, name: str, *, host: str, secret: bytes,
                 timeout_s: float, port: int = 0, node: str = "", labels: list[str] | None = None) -> None:
        if not secret:
            raise ValueError("TcpMesh needs the launch secret: it never accepts unauthenticated peers")
        self.index, self.size, self.timeout_s, self.name = index, size, timeout_s, name
        self.labels = labels or [f"member {i}" for i in range(size)]
        self.seq = 0
        self._head = bytearray(HEADER.size)       # swap()'s received header
        self.error: BaseException | None = None
        key = f"shardserve/tcpmesh/{name}"
        self._error_key = f"{key}/error"
        try:
            listener = socket.create_server((host, port), backlog=max(size, 8))
        except OSError as exc:
            raise ConnectionError(f"TCP collectives {name}: {self.labels[index]} on node {node or host} cannot "
                                  f"listen on {host}:{port} ({exc}); free that port or set "
                                  "SHARDSERVE_COLLECTIVES_PORT") from None
        port = listener.getsockname()[1]
        self.peers: list[Peer | None] = [None] * size
        accepted: dict[int, socket.socket] = {}
        try:
            store.set(f"{key}/addr/{index}", f"{host}|{port}|{node}")
            acceptor_error: list[BaseException] = []
            deadline = time.monotonic() + timeout_s
            acceptor = threading.Thread(target=self._accept_all, args=(listener, secret, store, deadline, accepted,
                                                                        acceptor_error), daemon=True)
            acceptor.start()
            try:
                for j in range(size):
                    if j != index:
                        h, p, n = store.get(f"{key}/addr/{j}").decode().split("|")
                        self.peers[j] = Peer(j, h, int(p), n)
                # the connector gives up first, so the member that knows the cause reports it to everyone
                connect_deadline = deadline - min(1.0, 0.2 * timeout_s)
                for j in range(index):                    # connect to every lower member
                    self.peers[j].sock = self._connect(self.peers[j], secret, connect_deadline, store, node or host)
            finally:
                acceptor.join()
            if acceptor_error:
                raise acceptor_error[0]
            for j, sock in accepted.items():
                self.peers[j].sock = sock
        except BaseException:
            for sock in accepted.values():
                sock.close()
            self.close()
            raise
        finally:
            listener.close()
        for p in self.peers:
            if p is not None:
                p.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                whole, frac = divmod(timeout_s, 1)
                tv = _TIMEVAL.pack(int(whole), int(frac * 1e6))
                p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    # ---------------------------------------------------------------- setup

    def _hello(self, j: int) -> bytes:
        return f"{self.name}|{j}".encode()

    def _fail_setup(self, store: dist.Store, message: str) -> ConnectionError:
        try:
            store.set(self._error_key, message)            # the others fail with this message, not a timeout
        except Exception:
            pass
        return ConnectionError(message)

    def _connect(self, peer: Peer, secret: bytes, deadline: float, store: dist.Store, me: str) -> socket.socket:
        """Connect to `peer` and authenticate both ways, retrying refused connections until the deadline."""
        last: Exception | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail_setup(store, (
                    f"TCP collectives {self.name}: {self.labels[self.index]} on node {me} cannot reach "
                    f"{self.labels[peer.index]} on node {peer.node or peer.host} at {peer.host}:{peer.port} within "
                    f"{self.timeout_s:.0f} s ({last}); open TCP port {peer.port} on {peer.host} to the other nodes "
                    "(a firewall?), set SHARDSERVE_COLLECTIVES_PORT to a port that is open, or "
                    "SHARDSERVE_TP_TRANSPORT=gloo"))
            try:
                sock = socket.create_connection((peer.host, peer.port), timeout=min(remaining, 10.0))
            except OSError as exc:
                last = exc
                if store.check([self._error_key]):
                    raise ConnectionError(store.get(self._error_key).decode()) from None
                time.sleep(min(0.2, max(remaining - 0.01, 0)))
                continue
            try:
                channel = client_handshake(sock, secret, f"{self.labels[peer.index]} at {peer.host}:{peer.port}",
                                           timeout_s=max(min(remaining, 10.0), 0.1))
                channel.send_bytes(self._hello(self.index))
                reply = channel.recv_bytes()
                if reply != b"ok":
                    raise ConnectionError(f"{self.labels[peer.index]} ({peer}) refused this member: "
                                          f"{reply.decode(errors='replace')}")
                return sock
            except BaseException as exc:
                sock.close()
                if isinstance(exc, (AuthError, OSError, EOFError)):
                    raise self._fail_setup(store, f"TCP collectives {self.name}: {self.labels[self.index]} could "
                                                  f"not authenticate with {self.labels[peer.index]} ({peer}): {exc}"
                                           ) from None
                raise

    def _accept_all(self, listener: socket.socket, secret: bytes, store: dist.Store, deadline: float,
                    accepted: dict[int, socket.socket], errors: list[BaseException]) -> None:
        """Accept and authenticate every higher member (runs in a thread during setup)."""
        expected = set(range(self.index + 1, self.size))
        listener.settimeout(_STORE_POLL_S)
        try:
            while expected - set(accepted):
                if time.monotonic() > deadline:
                    missing = sorted(expected - set(accepted))
                    raise ConnectionError(
                        f"TCP collectives {self.name}: " + ", ".join(
                            self.labels[j] + (f" ({self.peers[j]})" if self.peers[j] else "") for j in missing)
                        + f" did not connect to {self.labels[self.index]} at {listener.getsockname()[0]}:"
                        f"{listener.getsockname()[1]} within {self.timeout_s:.0f} s (a firewall on that port?)")
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    if store.check([self._error_key]):
                        raise ConnectionError(store.get(self._error_key).decode()) from None
                    continue
                try:
                    channel = accept_handshake(conn, secret)
                    hello = channel.recv_bytes().decode(errors="replace")
                    name, _, j = hello.rpartition("|")
                    if name != self.name or not j.isdigit() or int(j) not in expected or int(j) in accepted:
                        channel.send_bytes(f"unexpected member {hello!r}".encode())
                        conn.close()
                        continue
                    channel.send_bytes(b"ok")
                    conn.settimeout(None)
                    accepted[int(j)] = conn
                except (AuthError, OSError, EOFError):      # not one of us: drop it, keep listening
                    conn.close()
        except BaseException as exc:
            for s in accepted.values():
                s.close()
            accepted.clear()
            errors.append(exc)

    # ---------------------------------------------------------------- data

    def _lost(self, j: int, what: str) -> PeerLost:
        self.error = PeerLost(f"TCP collectives {self.name}: {self.labels[j]} ({self.peers[j]}) {what}")
        return self.error

    def exchange(self, sends: list[tuple[int, list]], recvs: list[tuple[int, list]]) -> None:
        """One call: send each (member, buffers) and receive each (member, buffers) at once, full duplex.

        Every member must make the matching calls in the same order; each message carries the call number and
        its size, checked on receipt. Buffers are C-contiguous buffer objects (numpy views of tensor memory,
        received into in place). After any failure the mesh is closed: every peer fails at once too."""
        if self.error is not None:
            raise self.error
        try:
            self._exchange(sends, recvs)
        except BaseException as exc:
            self.abort(exc)
            raise

    def _exchange(self, sends: list[tuple[int, list]], recvs: list[tuple[int, list]]) -> None:
        self.seq += 1
        out = []                                   # [member, buffers, bytes left]
        for j, bufs in sends:
            total = sum(b.nbytes for b in bufs)
            out.append([j, [HEADER.pack(self.seq, total), *bufs], HEADER.size + total])
        heads = [bytearray(HEADER.size) for _ in recvs]
        sizes = [sum(b.nbytes for b in bufs) for _, bufs in recvs]
        inc = [[j, [h, *bufs], HEADER.size + n] for h, (j, bufs), n in zip(heads, recvs, sizes)]
        for item in out:                           # usually the whole message fits the socket buffers at once
            self._send_some(item, nonblocking=True)
        if any(item[2] for item in out):
            self._progress(out, inc)
        else:
            for item in inc:
                while item[2]:
                    self._recv_some(item, nonblocking=False)
        for h, (j, _), n in zip(heads, recvs, sizes):
            self._check(j, h, n)

    def swap(self, j: int, send, recv) -> None:
        """exchange([(j, [send])], [(j, [recv])]) on its shortest path: one sendmsg, one recvmsg_into."""
        if self.error is not None:
            raise self.error
        try:
            self._swap(j, send, recv)
        except BaseException as exc:
            self.abort(exc)
            raise

    def _swap(self, j: int, send, recv) -> None:
        self.seq += 1
        total = HEADER.size + send.nbytes
        head = HEADER.pack(self.seq, send.nbytes)
        try:
            sent = self.peers[j].sock.sendmsg([head, send], [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._lost(j, f"is gone: {exc}") from None
        inc = [j, [self._head, recv], HEADER.size + recv.nbytes]
        if sent == total:
            while inc[2]:
                self._recv_some(inc, nonblocking=False)
        else:
            self._progress([[j, _advance([head, send], sent), total - sent]], [inc])
        self._check(j, self._head, recv.nbytes)

    def _check(self, j: int, head: bytearray, expect: int) -> None:
        seq, nbytes = HEADER.unpack(head)
        if seq != self.seq or nbytes != expect:
            self.error = RuntimeError(
                f"TCP collectives {self.name}: {self.labels[j]} sent call {seq} with {nbytes} bytes where call "
                f"{self.seq} with {expect} bytes was expected: the members ran different collectives")
            raise self.error

    def _send_some(self, item: list, nonblocking: bool) -> None:
        j, bufs, left = item
        try:
            n = self.peers[j].sock.sendmsg(bufs, [], socket.MSG_DONTWAIT if nonblocking else 0)
        except BlockingIOError:
            if nonblocking:
                return
            raise self._lost(j, f"did not take data for {self.timeout_s:.0f} s") from None
        except OSError as exc:
            raise self._lost(j, f"is gone: {exc}") from None
        item[1], item[2] = _advance(bufs, n), left - n

    def _recv_some(self, item: list, nonblocking: bool) -> None:
        j, bufs, left = item
        try:                                       # blocking: MSG_WAITALL, one wake-up for the whole message
            n = self.peers[j].sock.recvmsg_into(bufs, 0, socket.MSG_DONTWAIT if nonblocking else socket.MSG_WAITALL)[0]
        except BlockingIOError:
            if nonblocking:
                return
            self.error = TimeoutError(f"TCP collectives {self.name}: nothing from {self.labels[j]} ({self.peers[j]}) "
                                      f"within {self.timeout_s:.0f} s (distributed timeout)")
            raise self.error from None
        except OSError as exc:
            raise self._lost(j, f"is gone: {exc}") from None
        if n == 0 and left:
            raise self._lost(j, "closed the connection (its process exited?)")
        item[1], item[2] = _advance(bufs, n), left - n

    def _progress(self, out: list, inc: list) -> None:
        """Poll loop for messages larger than the socket buffers: send and receive as each side allows."""
        deadline = time.monotonic() + self.timeout_s
        poller = select.poll()
        fds = {}
        while any(item[2] for item in out) or any(item[2] for item in inc):
            events: dict[int, int] = {}
            for item in out:
                if item[2]:
                    fd = self.peers[item[0]].sock.fileno()
                    events[fd] = events.get(fd, 0) | select.POLLOUT
                    fds[fd] = item[0]
            for item in inc:
                if item[2]:
                    fd = self.peers[item[0]].sock.fileno()
                    events[fd] = events.get(fd, 0) | select.POLLIN
                    fds[fd] = item[0]
            for fd, ev in events.items():
                poller.register(fd, ev)
            ready = poller.poll(max(deadline - time.monotonic(), 0) * 1000)
            for fd in events:
                poller.unregister(fd)
            if not ready:
                j = fds[next(iter(events))]
                self.error = TimeoutError(f"TCP collectives {self.name}: no progress with {self.labels[j]} "
                                          f"({self.peers[j]}) within {self.timeout_s:.0f} s (distributed timeout)")
                raise self.error
            flags = dict(ready)
            for item in out:
                if item[2] and flags.get(self.peers[item[0]].sock.fileno(), 0) & (select.POLLOUT | select.POLLERR):
                    self._send_some(item, nonblocking=True)
            for item in inc:
                if item[2] and flags.get(self.peers[item[0]].sock.fileno(), 0) & (select.POLLIN | select.POLLHUP
                                                                                  | select.POLLERR):
                    self._recv_some(item, nonblocking=True)

    def abort(self, exc: BaseException) -> None:
        """Fail this mesh for good with `exc` (later calls raise it) and close the connections."""
        if self.error is None:
            self.error = exc
        self.close()

    def close(self) -> None:
        """Close every connection (idempotent); a peer blocked on us sees EOF at once."""
        for p in getattr(self, "peers", []):
            if p is not None and p.sock is not None:
                try:
                    p.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                p.sock.close()
                p.sock = None
        if self.error is None:
            self.error = RuntimeError(f"TCP collectives {self.name} are closed")


def _advance(bufs: list, n: int) -> list:
    """The buffers left after the first n bytes went out (or came in); a part-done one as a byte memoryview."""
    while bufs and (n or not _nbytes(bufs[0])):
        size = _nbytes(bufs[0])
        if n >= size:
            n -= size
            bufs = bufs[1:]
        else:
            bufs = [memoryview(bufs[0]).cast("B")[n:], *bufs[1:]]
            n = 0
    return bufs


def _nbytes(b) -> int:
    return b.nbytes if hasattr(b, "nbytes") else len(b)
