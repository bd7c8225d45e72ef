"""Authenticated messages over TCP: mutual challenge-response on a shared secret, then an HMAC on every frame.

Handshake (fixed sizes, nothing parsed beyond them): the listener sends MAGIC + a 32-byte nonce; the
connector answers its own nonce + HMAC(secret, "connector" | both nonces); the listener checks it and answers
HMAC(secret, "listener" | both nonces), which the connector checks. Both then derive a session key from the
secret and the nonces. Every later frame is [length u64][HMAC-SHA256(session, direction | seq | length |
payload)][payload]: a frame is verified before anyone unpickles it, and a replayed, reordered or altered
frame fails the check. Nothing received from the network is unpickled before that.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import struct
import threading
import time

MAGIC = b"shardserve-ctl/1"
NONCE_BYTES = 32
MAC_BYTES = 32
MAX_FRAME_BYTES = 1 << 31
HANDSHAKE_TIMEOUT_S = 10.0
_U64 = struct.Struct("<Q")


class AuthError(ConnectionError):
    """The peer does not hold the launch secret (or a frame was altered in transit)."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the peer closed the connection")
        got += k
    return bytes(buf)


class Channel:
    """One authenticated, framed, bidirectional connection. send() may be called from several threads;
    recv() from one thread at a time."""

    def __init__(self, sock: socket.socket, session_key: bytes, is_listener: bool):
        self.sock = sock
        self.key = session_key
        self.out_label, self.in_label = (b"L", b"C") if is_listener else (b"C", b"L")
        self.send_seq = self.recv_seq = 0
        self.send_lock = threading.Lock()

    def send_bytes(self, payload: bytes) -> None:
        with self.send_lock:
            header = _U64.pack(len(payload))
            mac = _mac(self.key, self.out_label, _U64.pack(self.send_seq), header, payload)
            if len(payload) < 65536:        # one write: with TCP_NODELAY a second would be a second packet
                self.sock.sendall(header + mac + payload)
            else:                           # no copy of a large payload
                self.sock.sendall(header + mac)
                self.sock.sendall(payload)
            self.send_seq += 1

    def recv_bytes(self) -> bytes:
        head = _recv_exact(self.sock, _U64.size + MAC_BYTES)
        header, mac = head[:_U64.size], head[_U64.size:]
        (length,) = _U64.unpack(header)
        if length > MAX_FRAME_BYTES:
            raise AuthError(f"frame of {length} bytes refused")
        payload = _recv_exact(self.sock, length)
        expected = _mac(self.key, self.in_label, _U64.pack(self.recv_seq), header, payload)
        if not hmac.compare_digest(mac, expected):
            raise AuthError("a message failed authentication (altered in transit, or not from the launch)")
        self.recv_seq += 1
        return payload

    def send(self, obj) -> None:
        self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        return pickle.loads(self.recv_bytes())    # only after recv_bytes verified the frame's HMAC

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def accept_handshake(sock: socket.socket, secret: bytes) -> Channel:
    """Listener side of the handshake on an accepted socket; AuthError when the connector lacks the secret.
    Returns a Channel with TCP_NODELAY set."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    mine = os.urandom(NONCE_BYTES)
    sock.sendall(MAGIC + mine)
    theirs = _recv_exact(sock, NONCE_BYTES)
    proof = _recv_exact(sock, MAC_BYTES)
    if not hmac.compare_digest(proof, _mac(secret, b"connector", mine, theirs)):
        raise AuthError("a connection without the launch secret was refused")
    sock.sendall(_mac(secret, b"listener", mine, theirs))
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(sock, _mac(secret, b"session", mine, theirs), is_listener=True)


def connect(host: str, port: int, secret: bytes, timeout_s: float, retry: bool = True) -> Channel:
    """Connect and authenticate, retrying refused connections until timeout_s (the listener may start later).

    ConnectionError names the address when nothing answers in time; AuthError when the listener rejects us."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(HANDSHAKE_TIMEOUT_S, max(timeout_s, 0.1)))
            break
        except OSError as exc:
            last = exc
            if not retry or time.monotonic() >= deadline:
                raise ConnectionError(f"cannot reach {host}:{port} within {timeout_s:.0f} s ({last})") from None
            time.sleep(0.2)
    try:
        return client_handshake(sock, secret, f"{host}:{port}")
    except BaseException:
        sock.close()
        raise


def client_handshake(sock: socket.socket, secret: bytes, where: str, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Channel:
    """Connector side of the handshake on a connected socket (`where` names the listener in errors); the socket
    is left open on failure. Returns a Channel with TCP_NODELAY set."""
    sock.settimeout(timeout_s)
    try:
        hello = _recv_exact(sock, len(MAGIC) + NONCE_BYTES)
    except (EOFError, ConnectionResetError):
        raise ConnectionError(f"{where} closed the connection before the handshake") from None
    if not hello.startswith(MAGIC):
        raise ConnectionError(f"{where} is not a shardserve control port")
    theirs, mine = hello[len(MAGIC):], os.urandom(NONCE_BYTES)
    sock.sendall(mine + _mac(secret, b"connector", theirs, mine))
    try:
        proof = _recv_exact(sock, MAC_BYTES)
    except (EOFError, ConnectionResetError):
        raise AuthError(f"{where} rejected this process's secret; every node of a launch needs the same "
                        "SHARDSERVE_SECRET") from None
    if not hmac.compare_digest(proof, _mac(secret, b"listener", theirs, mine)):
        raise AuthError(f"{where} does not hold the launch secret")
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(sock, _mac(secret, b"session", theirs, mine), is_listener=False)
