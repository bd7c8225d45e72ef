"""Ray compiled-graph executor (SHARDSERVE_RAY_COMPILED_DAG=1): local and two-host parity, a killed rank, cleanup."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_hosts as netns  # noqa: E402
import test_ray  # noqa: E402  (its prompts, driver environment and `ray start` helper)
from test_ray import LLM_KW, MAX_TOKENS, PROMPTS, RAY_PORT, generate  # noqa: E402
from test_ray import ray_cluster  # noqa: E402,F401  (the same two-host cluster, one per module)

ray = pytest.importorskip("ray", reason="the Ray executor tests need `pip install shardserve[ray]`")
DRIVER_TIMEOUT_S = 240
KILL_DEADLINE_S = 10.0          # a killed rank is a WorkerError within this


@pytest.fixture(scope="module")
def reference(llama_gqa) -> list[list[int]]:
    return generate(llama_gqa)[0]


@pytest.fixture
def compiled_dag(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_RAY_COMPILED_DAG", "1")


@pytest.mark.timeout(10)
def test_the_variable_selects_the_executor(monkeypatch):
    from shardserve.distributed import env
    monkeypatch.delenv("SHARDSERVE_RAY_COMPILED_DAG", raising=False)
    assert env.ray_compiled_dag() is False
    monkeypatch.setenv("SHARDSERVE_RAY_COMPILED_DAG", "1")
    assert env.ray_compiled_dag() is True
    monkeypatch.setenv("SHARDSERVE_RAY_COMPILED_DAG", "yes")
    with pytest.raises(ValueError, match="SHARDSERVE_RAY_COMPILED_DAG='yes': expected '0' or '1'"):
        env.ray_compiled_dag()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_local_ray_matches_and_cleans_up(compiled_dag, llama_gqa, reference, tp, pp):
    from shardserve import LLM, SamplingParams
    from shardserve.executor.ray_compiled_dag import RayCompiledDagExecutor
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("a Ray session is already open in this process")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(llama_gqa, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray",
              **LLM_KW)
    try:
        executor = llm.engine.executor
        assert isinstance(executor, RayCompiledDagExecutor) and executor.started_ray
        node = ray._private.worker._global_node
        pids = [*executor.pids, *(p.process.pid for procs in node.all_processes.values() for p in procs)]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == reference
        assert executor.collective_rpc("check_health") == [True] * (tp * pp)    # actor calls beside the DAG
    finally:
        llm.shutdown()
    assert not ray.is_initialized()
    assert not _alive(pids, 20), "Ray processes still running after shutdown"


@pytest.mark.timeout(180)
def test_local_killed_last_stage_is_a_worker_error(compiled_dag, llama_gqa):
    from shardserve import LLM
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("a Ray session is already open in this process")
    llm = LLM(llama_gqa, pipeline_parallel_size=2, distributed_executor_backend="ray", **LLM_KW)
    try:
        pids = list(llm.engine.executor.pids)
        error, seconds = kill_during_generate(llm, 1)
    finally:
        llm.shutdown()
    assert error.startswith("WorkerError: rank 1 (Ray actor) died") and seconds < KILL_DEADLINE_S, (error, seconds)
    assert not ray.is_initialized()
    assert not _alive(pids, 20)


# ---- two network-namespace hosts (test_ray's cluster fixture) ---------------------------------------------
def run_driver(host: netns.Host, model: str, tp: int, pp: int, kill_rank: int = -1) -> dict:
    env = {**test_ray._env(host), "RAY_ADDRESS": f"{host.ip}:{RAY_PORT}", "SHARDSERVE_RAY_COMPILED_DAG": "1"}
    argv = [sys.executable, os.path.abspath(__file__), model, str(tp), str(pp), str(kill_rank)]
    proc = host.run(argv, env=env, timeout=DRIVER_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_two_hosts_match_single_process(ray_cluster, llama_gqa, reference, tp, pp):
    a, _ = ray_cluster
    got = run_driver(a, llama_gqa, tp, pp)
    assert got["tokens"] == reference
    # ranks are placed driver's node first: tp=2 / pp=2 put one rank on each host, tp2xpp2 one stage on each
    per_host = tp * pp // 2
    assert got["node_ips"] == [ip for ip in netns.SUBNET_IPS for _ in range(per_host)], got
    assert not any(got["left"].values()), got


@pytest.mark.timeout(300)
def test_two_hosts_killed_rank_is_a_worker_error(ray_cluster, llama_gqa):
    """kill -9 of rank 1's actor (on host B, TP peer of rank 0 across the link) during generate."""
    a, _ = ray_cluster
    got = run_driver(a, llama_gqa, 2, 1, kill_rank=1)
    assert got["error"].startswith("WorkerError: rank 1 (Ray actor) died"), got
    assert got["seconds_to_error"] < KILL_DEADLINE_S, got
    assert not any(got["left"].values()), got


def kill_during_generate(llm, rank: int) -> tuple[str, float]:
    """SIGKILL rank's actor once two steps have run, while generate keeps stepping: the error and its delay."""
    import threading
    from shardserve import SamplingParams
    killed_at: list[float] = []

    def kill_after_two_steps():
        while llm.engine.num_steps < 2:
            time.sleep(0.001)
        os.kill(llm.engine.executor.pids[rank], 9)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_after_two_steps, daemon=True).start()
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    try:
        for _ in range(50):      # far longer than the kill takes to land: it lands mid-generate
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:500], time.monotonic() - killed_at[0]
    return "no error", 0.0


def _alive(pids: list[int], wait_s: float) -> list[int]:
    """pids still running (zombies excluded) after up to wait_s."""
    deadline = time.monotonic() + wait_s
    alive = [p for p in pids if test_ray._running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if test_ray._running(p)]
    return alive


def _driver(model: str, tp: int, pp: int, kill_rank: int) -> dict:
    """Inside namespace A: generate (killing kill_rank's actor after two steps when >= 0), shut down, and report
    tokens or the error, the ranks' hosts, and what of this launch is left (actor pids, placement groups)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from shardserve import LLM, SamplingParams
    ray.init(logging_level="warning")
    # tp=2 or pp=2 on 2 x 2 CPUs would pack on host A: one CPU held on each host spreads the ranks over both
    hold = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD") if tp * pp == 2 else None
    if hold is not None:
        ray.get(hold.ready(), timeout=60)
    out: dict = {}
    llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray",
              **LLM_KW)
    try:
        executor = llm.engine.executor
        out["node_ips"] = [node[1] for node in ray.get([a.node.remote() for a in executor.actors])]
        pids = list(executor.pids)
        if kill_rank < 0:
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            out["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        else:
            out["error"], out["seconds_to_error"] = kill_during_generate(llm, kill_rank)
    finally:
        llm.shutdown()
    if hold is not None:
        remove_placement_group(hold)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _live_placement_groups():
        time.sleep(0.2)
    out["left"] = {"pids": _alive(pids, 20), "placement_groups": _live_placement_groups()}
    return out


def _live_placement_groups() -> list[str]:
    return [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"]


if __name__ == "__main__":      # the driver, run inside namespace A: one JSON line
    model_path, tp_size, pp_size, rank_to_kill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(_driver(model_path, tp_size, pp_size, rank_to_kill)))
