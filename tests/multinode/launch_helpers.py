"""What the --nnodes launch tests share: a child's environment, a headless node's argv, waiting on a driver's
output, and waiting for a host's processes to be gone."""
from __future__ import annotations

import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(host_ip: str, secret: str, heartbeat_s: float, **extra: str) -> dict[str, str]:
    """This process's environment for a node at host_ip of a launch with this secret (the repo on PYTHONPATH)."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    out.update(SHARDSERVE_SECRET=secret, SHARDSERVE_HOST_IP=host_ip, SHARDSERVE_HEARTBEAT_TIMEOUT=str(heartbeat_s),
               **extra)
    return out


def headless_argv(master: str, port: int, timeout_s: float = 60, nnodes: int = 2, node_rank: int = 1) -> list[str]:
    return [sys.executable, "-m", "shardserve.entrypoints.cli", "serve", "--headless", "--nnodes", str(nnodes),
            "--node-rank", str(node_rank), "--master-addr", master, "--master-port", str(port),
            "--distributed-timeout-seconds", str(timeout_s)]


def follow_stdout(proc) -> tuple[list[str], threading.Thread]:
    """A list a daemon thread fills with proc's stdout lines as they come, and that thread (done at EOF)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return lines, reader


def wait_for_line(driver, lines: list[str], prefix: str, timeout: float = 180) -> None:
    """Until a line of the driver's stdout (collected into `lines` by a reader thread) starts with prefix; the
    driver must stay up meanwhile."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in lines):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()[-5000:]
        time.sleep(0.05)


def all_gone(*hosts, timeout: float = 15) -> list[int]:
    """[] once no process is left in the hosts' namespaces, else the pids still there after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for h in hosts for p in h.pids()]
        if not left:
            return []
        time.sleep(0.2)
    return left
