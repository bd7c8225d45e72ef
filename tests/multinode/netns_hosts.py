"""Two Linux network namespaces joined by a veth pair created inside them: a two-host cluster on one machine."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET_IPS = ("10.213.7.1", "10.213.7.2")


def available() -> str | None:
    """None when two-host tests can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"ssprobe{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "`ip netns add` fails here (no CAP_SYS_ADMIN?)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    """One namespace: its name and its address on the veth link."""
    ns: str
    ip: str
    ifname: str

    def cmd(self, argv: list[str]) -> list[str]:
        """argv run inside this namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), env=env, **kw)

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(argv), env=env, capture_output=True, text=True, timeout=timeout, check=check)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def set_link(self, up: bool) -> None:
        """Bring this host's end of the link up or down (cut the cable)."""
        _ip("-n", self.ns, "link", "set", self.ifname, "up" if up else "down")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def kill_namespace_pids(host: Host, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace until none is left (new ones may appear while we kill)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = host.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Namespaces A (10.213.7.1/24) and B (10.213.7.2/24), `lo` up in each, joined by a veth pair created in A
    and its peer moved to B: the root namespace gets no veth end and no route. Torn down also on failure."""
    tag = uuid.uuid4().hex[:6]
    hosts = (Host(f"ssA{tag}", SUBNET_IPS[0], "vethA"), Host(f"ssB{tag}", SUBNET_IPS[1], "vethB"))
    created: list[Host] = []
    try:
        for h in hosts:
            _ip("netns", "add", h.ns)
            created.append(h)
            _ip("-n", h.ns, "link", "set", "lo", "up")
        a, b = hosts
        _ip("-n", a.ns, "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
        for h in hosts:
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
        yield hosts
    finally:
        for h in created:
            kill_namespace_pids(h)
        for h in created:
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)


def forget_ray_cluster(ip: str) -> None:
    """`ray start --head` in a namespace records that cluster as this machine's current one; once it is gone, a
    later local Ray (address "auto") must not try to join it."""
    path = "/tmp/ray/ray_current_cluster"
    try:
        with open(path) as f:
            if f.read().startswith(ip):
                os.unlink(path)
    except OSError:
        pass
