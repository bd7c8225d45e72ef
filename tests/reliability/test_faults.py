"""Fault injection: kill -9 a worker (every rank of tp=2, pp=2, tp=2 x pp=2), kill -9 the driver, SIGTERM a
serving server, and kill a worker under a serving server. Nothing may hang, leak a process or leave /dev/shm
segments behind, and the error must name the rank and the cause."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from rel_util import alive, kill_quietly, launch_id_of, shm_leftovers, wait_until, worker_pids
from server_proc import REPO, ServerProcess
from shardserve import LLM, SamplingParams
from shardserve.executor.base import WorkerError

LAYOUTS = [(2, 1), (1, 2), (2, 2)]
CASES = [(tp, pp, victim) for tp, pp in LAYOUTS for victim in range(tp * pp)]
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
PROMPTS = [f"Request {i} asks about the weather in town" for i in range(48)]


def _mp_llm(model: str, tp: int, pp: int) -> LLM:
    return LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp",
               max_model_len=256, kv_cache_memory=16 << 20)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp,pp,victim", CASES, ids=[f"tp{t}-pp{p}-kill-rank{v}" for t, p, v in CASES])
def test_worker_kill_during_generate(llama_gqa, tp, pp, victim):
    llm = _mp_llm(llama_gqa, tp, pp)
    executor = llm.engine.executor
    pids = [p.pid for p in executor.procs]
    launch = executor.launch.launch_id
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = llm.generate(PROMPTS, LONG, use_tqdm=False)
        except BaseException as exc:            # noqa: BLE001 - we assert on it below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        assert wait_until(lambda: llm.engine.num_steps >= 5, 60), "generate did not get going"
        assert thread.is_alive(), "generate finished before the kill; make it longer"
        os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        thread.join(timeout=10)
        took = time.monotonic() - t0
        assert not thread.is_alive(), "generate did not return within 10 s of the worker's death"
        err = outcome.get("error")
        assert isinstance(err, WorkerError), f"expected WorkerError, got {outcome!r}"
        assert f"rank {victim}" in str(err) and "signal 9" in str(err), str(err)
        print(f"tp={tp} pp={pp}: killed rank {victim} -> {type(err).__name__} in {took:.2f} s: {err}")
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), \
            f"workers still alive: {[p for p in pids if alive(p)]}"
        assert shm_leftovers(launch) == []
        with pytest.raises(RuntimeError, match="worker failed"):
            llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()
        for p in pids:
            kill_quietly(p)
    assert not any(alive(p) for p in pids)
    assert shm_leftovers(launch) == []


@pytest.mark.timeout(120)
def test_frozen_worker_is_detected_by_its_liveness_beat(llama_gqa, monkeypatch):
    """SIGSTOP (not kill) rank 1 of tp=2 mid-generation: its process is alive but silent; the driver notices the
    missing liveness beats within the heartbeat timeout, names the rank, and nothing is left behind."""
    monkeypatch.setenv("SHARDSERVE_HEARTBEAT_TIMEOUT", "3")
    llm = _mp_llm(llama_gqa, 2, 1)
    pids = [p.pid for p in llm.engine.executor.procs]
    launch = llm.engine.executor.launch.launch_id
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = llm.generate(PROMPTS, LONG, use_tqdm=False)
        except BaseException as exc:            # noqa: BLE001 - we assert on it below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        assert wait_until(lambda: llm.engine.num_steps >= 5, 60), "generate did not get going"
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        thread.join(timeout=15)
        took = time.monotonic() - t0
        assert not thread.is_alive(), "a frozen worker hung generate"
        err = outcome.get("error")
        assert isinstance(err, WorkerError) and "rank 1" in str(err) and "stopped answering" in str(err), outcome
        assert 3 <= took < 3 + 5, f"detected after {took:.1f} s with a 3 s timeout"
        print(f"tp=2: SIGSTOP of rank 1 -> {err} after {took:.1f} s")
        assert wait_until(lambda: not any(alive(p) for p in pids), 10)
        assert shm_leftovers(launch) == []
    finally:
        llm.shutdown()
        for p in pids:
            kill_quietly(p)


DRIVER = textwrap.dedent("""
    import sys
    from shardserve import LLM, SamplingParams

    if __name__ == "__main__":                   # workers are spawned: they re-import this file
        llm = LLM(sys.argv[1], tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="mp",
                  max_model_len=256, kv_cache_memory=16 << 20)
        ex = llm.engine.executor
        print("WORKERS", ex.launch.launch_id, *[p.pid for p in ex.procs], flush=True)
        while True:
            llm.generate(["a driver that will be killed"] * 16,
                         SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), use_tqdm=False)
            print("ROUND", flush=True)
""")


@pytest.mark.timeout(120)
def test_driver_kill_takes_workers_down(llama_gqa, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), llama_gqa], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    pids: list[int] = []
    launch = None
    try:
        for line in proc.stdout:
            if line.startswith("WORKERS"):
                _, launch, *rest = line.split()
                pids = [int(p) for p in rest]
                break
        assert len(pids) == 4, f"driver did not report its workers (exit {proc.poll()}): {proc.stdout.read()}"
        time.sleep(1.0)                                   # let it generate for a moment
        assert proc.poll() is None and all(alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), \
            f"workers outlived the driver: {[p for p in pids if alive(p)]}"
        print(f"driver SIGKILLed: its 4 workers gone after {time.monotonic() - t0:.2f} s; "
              f"/dev/shm leftovers: {shm_leftovers(launch)}")
        assert shm_leftovers(launch) == []
    finally:
        kill_quietly(proc.pid)
        for p in pids:
            kill_quietly(p)
        proc.wait(timeout=10)
        if launch:
            for name in shm_leftovers(launch):          # never leave the test's own mess behind
                os.unlink(os.path.join("/dev/shm", name))


def _stream(url: str, body: dict, seen: dict, key: int) -> None:
    lines = seen.setdefault(key, [])                     # visible while it streams
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            seen.setdefault("status", []).append(r.status_code)
            for line in r.iter_lines():
                if line:
                    lines.append(line)
    except httpx.HTTPError as exc:
        lines.append(f"transport error: {type(exc).__name__}")
    seen[key] = lines


def _start_streams(url: str, n: int, max_tokens: int) -> tuple[list[threading.Thread], dict]:
    seen: dict = {}
    body = {"model": "tiny", "prompt": "Stream me something long", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    threads = [threading.Thread(target=_stream, args=(url, body, seen, i), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, seen


def _wait_streaming(seen: dict, n: int, timeout: float = 60) -> None:
    """Until each of the n streams has a token on the wire (a 200-token stream of the tiny model lasts well
    under a second, so no fixed sleep: the fault must land mid-stream)."""
    assert wait_until(lambda: all(len(seen.get(i, [])) >= 1 for i in range(n)), timeout, 0.005), "no stream started"


@pytest.mark.timeout(150)
def test_sigterm_while_streaming_exits_clean(llama_gqa):
    srv = ServerProcess(llama_gqa, "-tp", "2")
    launch = launch_id_of(srv.proc.pid)
    try:
        assert launch, "cannot find the server's launch id in its memory maps"
        threads, seen = _start_streams(srv.url, 6, 120)
        _wait_streaming(seen, 6)
        t0 = time.monotonic()
        code = srv.terminate(timeout=60)
        took = time.monotonic() - t0
        for t in threads:
            t.join(timeout=30)
        done = sum(1 for i in range(6) if seen.get(i) and seen[i][-1] == "data: [DONE]")
        print(f"SIGTERM during 6 streams: exit {code} after {took:.1f} s; {done}/6 streams ended with [DONE]")
        assert code == 0, srv.output()
        assert srv.children() == []
        assert shm_leftovers(launch) == []
    finally:
        srv.kill()


@pytest.mark.timeout(150)
def test_worker_killed_under_server(llama_gqa):
    srv = ServerProcess(llama_gqa, "-tp", "2")
    launch = launch_id_of(srv.proc.pid)
    try:
        workers = worker_pids(srv.proc.pid, 2)
        assert len(workers) == 2, workers
        threads, seen = _start_streams(srv.url, 4, 200)
        blocking: dict = {}

        def non_streaming():
            body = {"model": "tiny", "prompt": "Not streamed", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
            blocking["status"], blocking["body"] = r.status_code, r.json()

        nb = threading.Thread(target=non_streaming, daemon=True)
        nb.start()
        _wait_streaming(seen, 4)
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        for t in (*threads, nb):
            t.join(timeout=10)
        assert not any(t.is_alive() for t in (*threads, nb)), "in-flight requests hang after a worker died"
        took = time.monotonic() - t0
        for i in range(4):
            errors = [line for line in seen[i] if '"error"' in line]
            assert errors and "rank 1" in errors[0], seen[i][-3:]
        assert blocking["status"] == 503 and "rank 1" in blocking["body"]["error"]["message"], blocking
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and "error" in health.json()
        new = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                         timeout=10)
        assert new.status_code == 503 and new.json()["error"]["type"] == "service_unavailable"
        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=10,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 503
        print(f"worker rank 1 killed under the server: 5 in-flight requests failed within {took:.2f} s; "
              f"/health {health.status_code}: {health.json()['error']['message']}")
        assert srv.terminate(timeout=60) == 0, srv.output()
        assert srv.children() == []
        assert launch and shm_leftovers(launch) == []
    finally:
        srv.kill()


@pytest.mark.timeout(120)
def test_idle_worker_death_shows_in_health(llama_gqa):
    """No request in flight: /health must still notice a dead worker (within a few seconds)."""
    srv = ServerProcess(llama_gqa, "-tp", "2")
    try:
        workers = worker_pids(srv.proc.pid, 2)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        assert wait_until(lambda: httpx.get(srv.url + "/health", timeout=5).status_code == 503, 10, 0.2), \
            "/health still says ok 10 s after a worker died"
        body = httpx.get(srv.url + "/health", timeout=5).json()
        assert "rank 0" in body["error"]["message"], body
        new = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                         timeout=10)
        assert new.status_code == 503
        assert srv.terminate(timeout=60) == 0, srv.output()
        assert srv.children() == []
    finally:
        srv.kill()
