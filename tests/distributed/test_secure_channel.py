"""The authenticated control port: wrong secrets refused, altered or replayed frames never unpickled, store semantics."""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import struct
import threading

import pytest

from shardserve.distributed.control_server import ControlServer, SecureStore
from shardserve.distributed.secure_channel import MAC_BYTES, AuthError, Channel, accept_handshake, connect

SECRET = b"s" * 32

pytestmark = pytest.mark.timeout(60)


class _Boom:
    """Unpickling this creates a file: proof that a frame was (or was not) unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pair():
    """(listener_channel, connector_channel) over loopback, after the handshake."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("ch", accept_handshake(server.accept()[0], SECRET)))
    t.start()
    client = connect("127.0.0.1", port, SECRET, 10)
    t.join()
    server.close()
    return box["ch"], client


def test_messages_round_trip_both_ways():
    a, b = _pair()
    b.send({"x": [1, 2, 3]})
    assert a.recv() == {"x": [1, 2, 3]}
    a.send(("ok", b"\0" * 100_000))
    assert b.recv() == ("ok", b"\0" * 100_000)
    a.close(), b.close()


def test_altered_frame_is_refused_before_unpickling(tmp_path):
    a, b = _pair()
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(str(marker)))
    # a forged frame: right length, wrong MAC (the attacker lacks the session key)
    b.sock.sendall(struct.pack("<Q", len(payload)) + b"\0" * MAC_BYTES + payload)
    with pytest.raises(AuthError, match="failed authentication"):
        a.recv()
    assert not marker.exists()
    a.close(), b.close()


def test_replayed_frame_is_refused():
    a, b = _pair()
    b.send("first")
    header = a.sock.recv(8, socket.MSG_WAITALL)
    frame = header + a.sock.recv(MAC_BYTES + struct.unpack("<Q", header)[0], socket.MSG_WAITALL)
    wire, tap = socket.socketpair()              # replay the captured frame twice into the listener's side
    listener = Channel(tap, a.key, is_listener=True)
    wire.sendall(frame + frame)
    assert listener.recv() == "first"
    with pytest.raises(AuthError):               # same bytes, but its sequence number is now stale
        listener.recv()
    for c in (a, b, listener):
        c.close()
    wire.close()


def test_wrong_secret_is_refused_and_counted():
    server = ControlServer("127.0.0.1", 0, SECRET)
    try:
        with pytest.raises(AuthError, match="SHARDSERVE_SECRET"):
            connect("127.0.0.1", server.port, b"w" * 32, 5)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=5)
        while server.rejected == 0 and datetime.datetime.now() < deadline:
            pass
        assert server.rejected == 1
    finally:
        server.close()


def test_nothing_listening_is_a_clear_error():
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ConnectionError, match=f"cannot reach 127.0.0.1:{port} within 1 s"):
        connect("127.0.0.1", port, SECRET, 1)


def test_store_has_tcpstore_semantics():
    server = ControlServer("127.0.0.1", 0, SECRET)
    store = SecureStore("127.0.0.1", server.port, SECRET, timeout_s=2)
    try:
        store.set("k", "v")
        assert store.get("k") == b"v"
        assert store.add("n", 2) == 2 and store.add("n", 3) == 5
        assert store.compare_set("c", "", "first") == b"first"          # absent + empty expected: set
        assert store.compare_set("c", "wrong", "second") == b"first"    # mismatch: current value back
        assert store.compare_set("c", "first", "third") == b"third"
        assert store.check(["k", "n"]) and not store.check(["missing"])
        assert store.delete_key("k") and not store.check(["k"])
        with pytest.raises(RuntimeError, match="not set within"):
            store.wait(["never"], datetime.timedelta(seconds=0.3))
        other = SecureStore("127.0.0.1", server.port, SECRET, timeout_s=5)
        setter = threading.Timer(0.2, lambda: other.set("late", b"1"))
        setter.start()
        assert store.get("late") == b"1"                                # get blocks until another rank sets it
        setter.join(timeout=5)                  # its set() may still await the reply: close only after it
        other.close()
    finally:
        store.close()
        server.close()


def test_gloo_rendezvous_through_the_secure_store():
    """torch.distributed accepts the store: a one-rank Gloo group initialises and all-reduces through it."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    server = ControlServer("127.0.0.1", 0, SECRET)
    store = SecureStore("127.0.0.1", server.port, SECRET, timeout_s=10)
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert server.store.data, "Gloo wrote its rendezvous keys to our store"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        store.close()
        server.close()
        os.environ.pop("MASTER_ADDR", None)
