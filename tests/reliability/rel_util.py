"""Helpers for the reliability tests: process liveness, /dev/shm leftovers, a server's launch id and workers."""
from __future__ import annotations

import os
import re
import signal
import time

SHM = "/dev/shm"
_LAUNCH_RE = re.compile(r"/dev/shm/shardserve-([0-9a-f]{12})-r0-bcast")    # node 0's command ring


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def shm_leftovers(launch_id: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if launch_id in n)


def launch_id_of(pid: int) -> str | None:
    """The mp executor's launch id, read from the broadcast segment that `pid` (the driver) maps."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            m = _LAUNCH_RE.search(f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(server_pid: int, expected: int, timeout: float = 30) -> list[int]:
    """The spawned rank processes of a server (its multiprocessing children other than the resource tracker)."""
    found: list[int] = []

    def look() -> bool:
        nonlocal found
        found = sorted(p for p in children(server_pid)
                       if "multiprocessing" in cmdline(p) and "resource_tracker" not in cmdline(p))
        return len(found) >= expected
    wait_until(look, timeout, 0.2)
    return found


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
