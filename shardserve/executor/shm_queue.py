"""Shared-memory broadcast queue: the driver writes each message once, every local worker reads it.

A ring of fixed-size slots in one /dev/shm segment. Slot k of message m is slot (seq % n_slots); a
message larger than one slot spans several consecutive slots. Each reader owns a semaphore (the
writer releases it once per slot written, so readers block in the kernel instead of spinning: ranks may
outnumber cores) and a read counter in the segment, written only by that reader, so the writer knows
which slots everyone has finished with. No atomics are needed: every counter has a single writer.

Layout: [write_seq u64][read_seq u64 x readers] then n_slots x ([length u64][payload slot_bytes]).
"""
from __future__ import annotations

import mmap
import os
import struct
import time

_U64 = struct.Struct("<Q")


class _Segment:
    def __init__(self, path: str, n_readers: int, n_slots: int, slot_bytes: int, create: bool):
        self.path, self.n_readers, self.n_slots, self.slot_bytes = path, n_readers, n_slots, slot_bytes
        self.header = 8 * (1 + n_readers)
        self.stride = 8 + slot_bytes
        size = self.header + n_slots * self.stride
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        except BaseException:
            if create:                              # a half-made segment must not outlive the failure
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        finally:
            os.close(fd)

    def get(self, offset: int) -> int:
        return _U64.unpack_from(self.buf, offset)[0]

    def put(self, offset: int, value: int) -> None:
        _U64.pack_into(self.buf, offset, value)

    def slot(self, seq: int) -> int:
        return self.header + (seq % self.n_slots) * self.stride

    def close(self) -> None:
        try:
            self.buf.close()
        except (BufferError, ValueError):
            pass


class BroadcastWriter:
    """Created by the driver before it spawns the workers; `reader_handle(i)` goes to worker i."""

    def __init__(self, name: str, semaphores: list, n_slots: int = 16, slot_bytes: int = 1 << 20):
        self.path = f"/dev/shm/{name}"
        self.sems = semaphores
        self.seg = _Segment(self.path, len(semaphores), n_slots, slot_bytes, create=True)
        self.seq = 0

    def reader_handle(self, index: int) -> tuple:
        s = self.seg
        return (self.path, s.n_readers, s.n_slots, s.slot_bytes, index, self.sems[index])

    def write(self, payload: bytes, alive=lambda: True) -> None:
        """Copy payload into as many slots as it needs, waking every reader once per slot."""
        s = self.seg
        view = memoryview(payload)
        parts = max(1, -(-len(payload) // s.slot_bytes))
        for k in range(parts):
            self._wait_free(alive)
            chunk = view[k * s.slot_bytes:(k + 1) * s.slot_bytes]
            off = s.slot(self.seq)
            # length word: total length on the first slot of a message, with the high bit marking "first"
            s.put(off, (len(payload) | (1 << 63)) if k == 0 else len(chunk))
            s.buf[off + 8: off + 8 + len(chunk)] = chunk
            self.seq += 1
            s.put(0, self.seq)
            for sem in self.sems:
                sem.release()

    def _wait_free(self, alive) -> None:
        """Block while the slot we are about to reuse is still unread by someone."""
        s, delay = self.seg, 1e-5
        while min(s.get(8 + 8 * i) for i in range(s.n_readers)) + s.n_slots <= self.seq:
            if not alive():
                raise BrokenPipeError("a reader of the broadcast queue is gone")
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def close(self) -> None:
        self.seg.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class BroadcastReader:
    def __init__(self, handle: tuple):
        path, n_readers, n_slots, slot_bytes, self.index, self.sem = handle
        self.seg = _Segment(path, n_readers, n_slots, slot_bytes, create=False)
        self.seq = 0

    def read(self, timeout: float | None = None) -> bytes:
        """The next message (blocks; TimeoutError after `timeout` seconds without one)."""
        first = self._next_slot(timeout)
        s = self.seg
        total = first & ~(1 << 63)
        out = bytearray(total)
        got = 0
        while True:
            off = s.slot(self.seq)
            n = min(total - got, s.slot_bytes)
            out[got:got + n] = s.buf[off + 8: off + 8 + n]
            got += n
            self.seq += 1
            s.put(8 + 8 * self.index, self.seq)     # this slot is free for the writer again
            if got >= total:
                return bytes(out)
            self._next_slot(timeout)

    def _next_slot(self, timeout: float | None) -> int:
        if not self.sem.acquire(timeout=timeout):
            raise TimeoutError("no message from the driver")
        return self.seg.get(self.seg.slot(self.seq))

    def close(self) -> None:
        self.seg.close()
