"""Shared-memory all-reduce / all-gather / barrier for the CPU ranks of one group on one node."""

from __future__ import annotations

import errno
import math
import mmap
import os
import platform
import time
import uuid
from collections import OrderedDict

import torch
import torch.distributed as dist

# Segment layout (one file in /dev/shm per group, mapped by every member):
#   [flags: world * 64 bytes]  per rank, on its own cache line: int64 arrival counter, int64 pid
#   [data:  2 halves * world slots * slot_bytes]
# Call number s (s = 1, 2, ...) uses half s % 2. Rank r copies its (chunk of) tensor into its slot of
# that half, then publishes flags[r] = s and waits until flags[j] >= s for every j. Every call waits
# for all arrivals, so when a rank starts call s+2 (and overwrites half s % 2 again) every peer has
# arrived at s+1, i.e. has finished reading call s. One synchronisation per call, no second phase.
# On x86 (TSO) a peer that sees flags[r] == s also sees the slot data written before it; elsewhere
# there is no fence from Python, so SHM_SUPPORTED is False and callers use torch.distributed.
SHM_SUPPORTED = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FLAG_STRIDE = 8  # int64 words between flags (64 bytes: one cache line each)
_PID = 1  # word offset of the owner's pid within its cache line (0 = not checkable)
_PID_NS = 2  # word offset of the owner's pid namespace (inode of /proc/self/ns/pid; 0 = unknown)
_LIVENESS_EVERY_S = 0.05  # how often a long wait checks that the awaited peer still exists
_SHM_DIR = "/dev/shm"
# 4 MiB: larger tensors go in chunks (measured no slower than 16 MiB slots up to 16 MiB tensors), and
# the segment (2 * world * slot) stays small enough for a container's default 64 MiB /dev/shm.
DEFAULT_SLOT_BYTES = 4 * 1024 * 1024

# dtypes the shm path reduces; anything else goes through torch.distributed.
SHM_DTYPES = frozenset(
    {torch.float32, torch.float64, torch.float16, torch.bfloat16,
     torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64}
)


class ShmUnavailable(OSError):
    """The segment could not be created (e.g. /dev/shm full); raised on every member alike."""


class ShmCommunicator:
    """All-reduce (sum, in fixed rank order) and all-gather over one shared-memory segment.

    Every member constructs it with the same `name` and the same store; rank 0 creates the segment,
    the others attach, and once all have attached rank 0 unlinks the file, so nothing is left in
    /dev/shm even if a process dies later (the memory lives until the last mapping goes away).
    Tensors larger than a slot are processed in slot-sized chunks. A wait on a peer that has exited
    raises RuntimeError within ~50 ms; one that is merely slow raises TimeoutError after timeout_s.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: dist.Store,
        name: str,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        timeout_s: float = 300.0,
    ) -> None:
        if not 0 <= rank < world_size or world_size < 2:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size, world_size >= 2")
        self.rank, self.world_size = rank, world_size
        self.slot_bytes = max(64, (slot_bytes + 63) // 64 * 64)
        self.timeout_s = timeout_s
        self._seq = 0
        self._closed = False
        flags_bytes = world_size * _FLAG_STRIDE * 8
        total = flags_bytes + 2 * world_size * self.slot_bytes
        # A per-rank call counter makes the key unique when the same name is set up twice on one store
        # (every member calls this the same number of times, so all agree on `gen`).
        gen = store.add(f"shardserve/shm/{name}/gen/{rank}", 1)
        key = f"shardserve/shm/{name}/{gen}"

        if rank == 0:
            self.path = os.path.join(_SHM_DIR, f"shardserve-{name}-{uuid.uuid4().hex[:12]}")
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    # Reserve the pages now: a full /dev/shm fails here (ENOSPC) instead of SIGBUS later.
                    try:
                        os.posix_fallocate(fd, 0, total)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        os.ftruncate(fd, total)  # a filesystem without fallocate
                    self._mmap = mmap.mmap(fd, total)
                finally:
                    os.close(fd)
            except OSError as exc:
                _unlink_quiet(self.path)
                store.set(key, "")  # tells the peers: no segment, fall back together
                raise ShmUnavailable(f"cannot create a {total >> 20} MiB segment in {_SHM_DIR}: {exc}") from exc
            except BaseException:
                _unlink_quiet(self.path)
                raise
            store.set(key, self.path)
        else:
            # Blocks (up to the store's timeout) until rank 0 has published the path ("" = failed).
            self.path = store.get(key).decode()
            if not self.path:
                raise ShmUnavailable(f"rank 0 of shm group {name!r} could not create its segment")
            fd = os.open(self.path, os.O_RDWR)
            try:
                self._mmap = mmap.mmap(fd, total)
            finally:
                os.close(fd)
        self._flags = memoryview(self._mmap).cast("B")[:flags_bytes].cast("q")  # int64 words
        self._flags[rank * _FLAG_STRIDE + _PID] = os.getpid()
        self._flags[rank * _FLAG_STRIDE + _PID_NS] = _pid_namespace()
        try:
            # Everyone attached -> rank 0 removes the name; the mappings stay valid.
            store.add(f"{key}/attached", 1)
            deadline = time.monotonic() + timeout_s
            while store.add(f"{key}/attached", 0) < world_size:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shm segment {self.path}: not every rank attached in {timeout_s}s")
                time.sleep(0.0005)
        finally:
            if rank == 0:
                _unlink_quiet(self.path)
        # Peer pids we can check: those in our pid namespace (0 otherwise: no liveness check). A peer that
        # already exited keeps its pid here, so the first wait on it fails fast instead of timing out.
        own_ns, pids = _pid_namespace(), [int(self._flags[j * _FLAG_STRIDE + _PID]) for j in range(world_size)]
        if own_ns:
            self._peer_pid = [pid if int(self._flags[j * _FLAG_STRIDE + _PID_NS]) == own_ns else 0
                              for j, pid in enumerate(pids)]
        else:                                   # no /proc: a pid that does not answer is taken as foreign
            self._peer_pid = [pid if _pid_alive(pid) else 0 for pid in pids]

        buf = torch.frombuffer(self._mmap, dtype=torch.uint8)  # [total] bytes, aliases the segment
        # slots[h][r]: [slot_bytes] uint8 view of rank r's slot in half h
        self._slots = [
            [buf[flags_bytes + (h * world_size + r) * self.slot_bytes:][: self.slot_bytes] for r in range(world_size)]
            for h in range(2)
        ]
        self._views: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()

    # ---------------------------------------------------------------- synchronisation

    def _arrive_and_wait(self) -> None:
        """Publish arrival for the current call and wait for every peer's (spin, yield, then sleep:
        ranks may outnumber cores, and a pure spin would starve the peer we are waiting for)."""
        s, flags = self._seq, self._flags
        flags[self.rank * _FLAG_STRIDE] = s
        for j in range(self.world_size):
            idx = j * _FLAG_STRIDE
            if flags[idx] >= s:
                continue
            for _ in range(64):  # ~5 us of spinning: catches the peer that is already running
                if flags[idx] >= s:
                    break
            else:
                self._wait_slow(j, s)

    def _wait_slow(self, j: int, s: int) -> None:
        """Wait for flags[j] >= s: sched_yield ~2000 times, then 50 us sleeps, then 1 ms sleeps."""
        flags, idx = self._flags, j * _FLAG_STRIDE
        start = last_check = time.monotonic()
        n = 0
        while flags[idx] < s:
            n += 1
            if n < 2000:
                os.sched_yield()  # lets a peer sharing this core run
                continue
            time.sleep(0.00005 if n < 4000 else 0.001)
            now = time.monotonic()
            if now - last_check > _LIVENESS_EVERY_S:
                last_check = now
                if flags[idx] >= s:
                    break
                if self._peer_pid[j] and not _pid_alive(self._peer_pid[j]):
                    raise RuntimeError(
                        f"shm collective: peer rank {j} (pid {self._peer_pid[j]}) exited before call {s}"
                    )
                if now - start > self.timeout_s:
                    raise TimeoutError(f"shm collective: rank {j} did not arrive within {self.timeout_s}s")

    def barrier(self) -> None:
        """Return once every member has called barrier()."""
        self._check_open()
        self._seq += 1
        self._arrive_and_wait()

    # ---------------------------------------------------------------- collectives

    def _typed_slots(self, half: int, dtype: torch.dtype, shape: torch.Size) -> list[torch.Tensor]:
        """[world] views of `shape` / `dtype` at the start of each slot of `half` (cached)."""
        key = (half, dtype, shape)
        views = self._views.get(key)
        if views is None:
            nbytes = shape.numel() * dtype.itemsize
            views = [slot[:nbytes].view(dtype).view(shape) for slot in self._slots[half]]
            self._views[key] = views
            if len(self._views) > 64:
                self._views.popitem(last=False)
        return views

    def _chunk_numel(self, dtype: torch.dtype) -> int:
        return self.slot_bytes // dtype.itemsize

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group, summed in rank order 0, 1, ... (bit-identical on every rank).

        The result is written into x when x is contiguous (x is consumed) and returned.
        """
        self._check_open()
        out = x if x.is_contiguous() else x.contiguous()
        step = self._chunk_numel(x.dtype)
        if out.numel() <= step:  # one chunk: work on out's own shape (saves two views per call)
            chunks = [out] if out.numel() else []
        else:
            flat = out.view(-1)  # [numel]
            chunks = [flat[c0:c0 + step] for c0 in range(0, flat.numel(), step)]
        for chunk in chunks:
            self._seq += 1
            slots = self._typed_slots(self._seq % 2, x.dtype, chunk.shape)
            slots[self.rank].copy_(chunk)
            self._arrive_and_wait()
            # chunk = ((slot0 + slot1) + slot2) + ...: the same ops on the same data on every rank
            torch.add(slots[0], slots[1], out=chunk)
            for j in range(2, self.world_size):
                chunk.add_(slots[j])
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1, *, first_only: bool = False) -> torch.Tensor | None:
        """Concatenation along `dim` of every member's x (all members must pass the same shape and dtype).

        With first_only=True only rank 0 reads the result (a gather); the others return None.
        """
        self._check_open()
        src = x.contiguous().view(-1)  # [n]
        n = src.numel()
        gathered = torch.empty((self.world_size, n), dtype=x.dtype) if not first_only or self.rank == 0 else None
        step = self._chunk_numel(x.dtype)
        for c0 in range(0, n, step) if n else ():
            c1 = min(c0 + step, n)
            self._seq += 1
            slots = self._typed_slots(self._seq % 2, x.dtype, torch.Size([c1 - c0]))
            slots[self.rank].copy_(src[c0:c1])
            self._arrive_and_wait()
            if gathered is not None:
                for j in range(self.world_size):
                    gathered[j, c0:c1].copy_(slots[j])
        if gathered is None:
            return None
        d = dim % max(x.dim(), 1)
        if x.dim() and math.prod(x.shape[:d]) == 1:  # the rows, in rank order, are the concatenation already
            return gathered.view(*x.shape[:d], self.world_size * x.shape[d], *x.shape[d + 1:])
        parts = gathered.view(self.world_size, *x.shape).unbind(0)  # world x [*x.shape]
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank src's x, copied into every other member's x (same shape and dtype everywhere; x contiguous)."""
        self._check_open()
        flat = x.view(-1)  # [n]
        step = self._chunk_numel(x.dtype)
        for c0 in range(0, flat.numel(), step):
            chunk = flat[c0:c0 + step]
            self._seq += 1
            slot = self._typed_slots(self._seq % 2, x.dtype, chunk.shape)[src]
            if self.rank == src:
                slot.copy_(chunk)
            self._arrive_and_wait()
            if self.rank != src:
                chunk.copy_(slot)
        return x

    # ---------------------------------------------------------------- lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ShmCommunicator is closed")

    def close(self) -> None:
        """Unmap the segment (idempotent). The /dev/shm name was already removed at construction."""
        if self._closed:
            return
        self._closed = True
        _unlink_quiet(self.path)  # normally already gone; covers a rank 0 that died early
        self._views.clear()
        self._slots = []
        self._flags.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a tensor view is still referenced somewhere; the mapping goes with the process

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _pid_namespace() -> int:
    """This process's pid namespace (the inode of /proc/self/ns/pid), 0 where that is unavailable."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _pid_alive(pid: int) -> bool:
    """True when process `pid` exists in this pid namespace and is not a zombie."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # field 3, after "(comm)"
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
