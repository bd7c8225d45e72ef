"""A failed mp start-up removes its /dev/shm segments and workers, and a missing main guard gets a clear error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import types
import uuid

import pytest

from rel_util import SHM, alive, kill_quietly, shm_leftovers, wait_until
from server_proc import REPO
from shardserve import LLM
from shardserve.executor import launch as launch_module, multiproc
from shardserve.executor.base import WorkerError

GUARD = 'if __name__ == "__main__":'


def _shardserve_shm() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith("shardserve-")}


def _mapped_anywhere(name: str) -> bool:
    """True if a live process maps /dev/shm/<name> (a concurrent launch's segment, not a leak)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if name in f.read():
                    return True
        except OSError:
            continue
    return False


def _leaked_since(before: set[str], since: float) -> list[str]:
    """shardserve segments created since `since` that no live process maps: what a failed launch left behind."""
    out = []
    for name in sorted(_shardserve_shm() - before):
        try:
            created = os.stat(os.path.join(SHM, name)).st_mtime
        except FileNotFoundError:
            continue
        if created >= since - 1 and not _mapped_anywhere(name):
            out.append(name)
    return out


def _pids_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (a subprocess and every process it started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read() and alive(int(pid)):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _spawned_workers() -> set[int]:
    """This process's live multiprocessing-spawned children (not the resource tracker)."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"spawn_main" in cmd and alive(int(pid)):
            out.add(int(pid))
    return out


@pytest.mark.timeout(180)
def test_script_without_main_guard_fails_clearly_and_cleanly(llama_gqa, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from shardserve import LLM
        llm = LLM({llama_gqa!r}, tensor_parallel_size=2, distributed_executor_backend="mp",
                  kv_cache_memory=16 << 20, max_model_len=128)
        print("BUILT")
    """))
    marker = f"SHARDSERVE_TEST_NOGUARD={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value, "PYTHONPATH": REPO}
    before, t0 = _shardserve_shm(), time.time()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for pid in _pids_with_env(marker):
                kill_quietly(pid)
            proc.kill()
            proc.communicate()
    try:
        assert proc.returncode != 0, out
        assert "BUILT" not in out
        assert GUARD in out and "re-ran your script's top-level code" in out, out
        assert "MainModuleReimportedError" in out, out
        assert wait_until(lambda: not _pids_with_env(marker), 10), f"left running: {_pids_with_env(marker)}"
        assert _leaked_since(before, t0) == []
    finally:
        for pid in _pids_with_env(marker):
            kill_quietly(pid)


@pytest.fixture
def launch(monkeypatch):
    """The next mp launch, watched: its id fixed in advance (its /dev/shm names contain it) and the workers already
    running noted; whatever it leaves behind is removed after the test, pass or fail."""
    launch_id = uuid.uuid4()
    monkeypatch.setattr(launch_module, "uuid", types.SimpleNamespace(uuid4=lambda: launch_id))
    watched = types.SimpleNamespace(id=launch_id.hex[:12], workers_before=_spawned_workers())
    yield watched
    for pid in _spawned_workers() - watched.workers_before:
        kill_quietly(pid)
    for name in shm_leftovers(watched.id):
        os.unlink(os.path.join(SHM, name))


def _mp_llm(model: str) -> LLM:
    return LLM(model, tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=16 << 20,
               max_model_len=128)


def _assert_nothing_left(launch) -> None:
    assert wait_until(lambda: not (_spawned_workers() - launch.workers_before), 10), \
        f"workers left running: {_spawned_workers() - launch.workers_before}"
    assert shm_leftovers(launch.id) == []


@pytest.mark.timeout(120)
def test_worker_that_fails_while_loading_leaves_nothing(llama_gqa, tmp_path, launch):
    """The driver reads only the config and tokenizer; the workers find the weights corrupt in load_model."""
    model = tmp_path / "corrupt"
    shutil.copytree(llama_gqa, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    with pytest.raises(WorkerError, match="rank"):
        _mp_llm(str(model))
    _assert_nothing_left(launch)


@pytest.mark.timeout(120)
def test_worker_that_dies_at_import_leaves_nothing(llama_gqa, tmp_path, monkeypatch, launch):
    """Every spawned worker exits while its interpreter starts (a sitecustomize on PYTHONPATH): the driver has
    already made the command ring and the control port."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('SHARDSERVE_TEST_DIE_AT_IMPORT'):\n    os._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SHARDSERVE_TEST_DIE_AT_IMPORT", "1")
    with pytest.raises(WorkerError, match="exited with code 3"):
        _mp_llm(llama_gqa)
    _assert_nothing_left(launch)


@pytest.mark.timeout(120)
def test_driver_error_while_spawning_leaves_nothing(llama_gqa, monkeypatch, launch):
    """The second worker's start raises in the driver, after the ring exists and rank 0 is running."""
    import multiprocessing.context as mpctx

    real_start, started = mpctx.SpawnProcess.start, []

    def start(self):
        if started:
            raise OSError("injected: cannot start another process")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(mpctx.SpawnProcess, "start", start)
    try:
        with pytest.raises(OSError, match="injected"):
            _mp_llm(llama_gqa)
        assert started and not started[0].is_alive()
        _assert_nothing_left(launch)
    finally:
        for proc in started:
            if proc.is_alive():
                proc.kill()


@pytest.mark.timeout(120)
def test_startup_timeout_leaves_nothing(llama_gqa, monkeypatch, launch):
    """A start-up that times out (here init_device gets 0 s) stops the workers and removes the ring."""
    monkeypatch.setattr(multiproc, "STARTUP_TIMEOUT_S", 0.0)
    monkeypatch.setattr(multiproc, "LIVENESS_POLL_S", 0.01)
    with pytest.raises(WorkerError, match="did not answer"):
        _mp_llm(llama_gqa)
    _assert_nothing_left(launch)
