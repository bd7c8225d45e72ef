"""Start a real `shardserve serve` process on a free loopback port, and stop it (no leftovers) afterwards."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, *args: str, api_key: str | None = None, startup_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "shardserve.entrypoints.cli", "serve", model, "--port", str(self.port),
               "--max-model-len", "256", "--kv-cache-memory", str(16 << 20), "--served-model-name", "tiny", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"shardserve-server-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise TimeoutError(f"server did not come up in {startup_timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def children(self, grace: float = 10.0) -> list[str]:
        """Processes still alive in the server's process group (waiting `grace` s for exiting ones)."""
        deadline = time.time() + grace
        while True:
            alive = []
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == self.proc.pid:
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if int(fields[2]) == self.proc.pid and fields[0] != "Z":      # pgrp == server pid, not a zombie
                    alive.append(f"{pid}: {cmd}")
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.2)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as a supervisor would; returns the exit code (killing everything if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def serving(model: str, *args: str, **kwargs) -> Iterator[ServerProcess]:
    """A ServerProcess for the block; on leaving it, SIGTERM must end the server with exit code 0 and no child
    process left (it is killed whatever happens)."""
    srv = ServerProcess(model, *args, **kwargs)
    try:
        yield srv
    finally:
        try:
            assert srv.terminate() == 0, srv.output()
            assert srv.children() == []
        finally:
            srv.kill()
