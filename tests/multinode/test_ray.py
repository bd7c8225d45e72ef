"""Ray executor: tp=2 / pp=2 across two network-namespace hosts, and tp=2 on a local Ray, equal one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_hosts as netns  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [[1, 5, 9, 200], [7, 8, 9], [300, 301, 302, 303, 304, 305]]
MAX_TOKENS = 8
LLM_KW = {"max_model_len": 128, "kv_cache_memory": 4 << 20}
RAY_PORT = 6379                # inside namespace A, whose port space is its own
DRIVER_TIMEOUT_S = 240
RAY_TOKEN = uuid.uuid4().hex + uuid.uuid4().hex     # this run's cluster token (Ray's token authentication)

ray = pytest.importorskip("ray", reason="the Ray executor tests need `pip install shardserve[ray]`")


def generate(model: str, **kw) -> tuple[list[list[int]], float]:
    """Greedy token ids for PROMPTS and the seconds generate() took."""
    from shardserve import LLM, SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model, **LLM_KW, **kw) as llm:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    return [list(o.outputs[0].token_ids) for o in outs], seconds


@pytest.fixture(scope="module")
def reference(llama_gqa) -> list[list[int]]:
    return generate(llama_gqa)[0]


def _env(host: netns.Host) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    out["SHARDSERVE_HOST_IP"] = host.ip
    out.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head in namespace A and a Ray worker node in namespace B (1 CPU each); killed by namespace pids."""
    reason = netns.available()
    if reason:
        pytest.skip(f"two-host Ray test: {reason}")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "1", "--object-store-memory", "200000000", "--disable-usage-stats"]
    tag = uuid.uuid4().hex[:6]
    with netns.two_hosts() as (a, b):
        _start(a, [ray_bin, "start", "--head", "--node-ip-address", a.ip, "--port", str(RAY_PORT),
                   "--include-dashboard", "false", "--temp-dir", f"/tmp/rA{tag}", *common])
        _start(b, [ray_bin, "start", "--address", f"{a.ip}:{RAY_PORT}", "--node-ip-address", b.ip,
                   "--temp-dir", f"/tmp/rB{tag}", *common])
        yield a, b


def _start(host: netns.Host, argv: list[str]) -> None:
    proc = host.run(argv, env=_env(host), check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} failed in {host.ns}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def run_driver(host: netns.Host, model: str, tp: int, pp: int) -> dict:
    env = {**_env(host), "RAY_ADDRESS": f"{host.ip}:{RAY_PORT}"}
    argv = [sys.executable, os.path.abspath(__file__), model, str(tp), str(pp)]
    proc = host.run(argv, env=env, timeout=DRIVER_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2-one-rank-per-host", "pp2-one-stage-per-host"])
def test_two_hosts_match_single_process(ray_cluster, llama_gqa, reference, tp, pp):
    a, _ = ray_cluster
    got = run_driver(a, llama_gqa, tp, pp)
    assert got["tokens"] == reference
    assert sorted(got["node_ips"]) == sorted(netns.SUBNET_IPS), got     # really one rank per host


@pytest.mark.timeout(300)
def test_local_ray_tp2_matches_and_cleans_up(llama_gqa, reference):
    from shardserve import LLM, SamplingParams
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("a Ray session is already open in this process")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(llama_gqa, tensor_parallel_size=2, distributed_executor_backend="ray", **LLM_KW)
    try:
        executor = llm.engine.executor
        assert executor.started_ray
        node = ray._private.worker._global_node
        pids = [*executor.pids, *(p.process.pid for procs in node.all_processes.values() for p in procs)]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == reference
    finally:
        llm.shutdown()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        time.sleep(0.2)
    assert not alive, f"Ray processes still running after shutdown: {alive}"


@pytest.mark.timeout(120)
def test_more_ranks_than_cluster_is_a_clear_error(llama_gqa):
    from shardserve import LLM
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="warning")
    try:
        with pytest.raises(ValueError, match="1 CPU but .* 2 ranks need one each"):
            LLM(llama_gqa, tensor_parallel_size=2, distributed_executor_backend="ray", **LLM_KW)
        assert all(p["state"] == "REMOVED" for p in ray.util.placement_group_table().values())
    finally:
        ray.shutdown()


@pytest.mark.timeout(180)
def test_dead_actor_is_a_worker_error_naming_the_rank(llama_gqa):
    from shardserve import LLM, SamplingParams
    from shardserve.executor.base import WorkerError
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    llm = LLM(llama_gqa, tensor_parallel_size=2, distributed_executor_backend="ray", **LLM_KW)
    try:
        os.kill(llm.engine.executor.pids[1], 9)
        with pytest.raises(WorkerError, match="rank 1"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=50),
                         use_tqdm=False)
    finally:
        llm.shutdown()
    assert not ray.is_initialized()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":      # the driver, run inside namespace A: tokens and timing as one JSON line
    model, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from shardserve import LLM, SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray",
             **LLM_KW) as llm:
        ips = ray.get([a.node.remote() for a in llm.engine.executor.actors])
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": seconds,
                      "node_ips": [i[1] for i in ips]}))


@pytest.mark.timeout(300)
def test_local_ray_runs_bfloat16(tmp_path):
    """bf16 (the one-call decoder on bf16 panels where the CPU has AVX512-BF16) on the Ray executor: tp=2 gives
    one process's greedy tokens under the parity rule, and every linear holds the format the mp executor's does."""
    import tiny_checkpoints
    from parity import check_parity, engine_runs
    from shardserve import LLM, SamplingParams
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("a Ray session is already open in this process")
    path = tiny_checkpoints.build_llama_bf16(str(tmp_path))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=5)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(path, **LLM_KW) as one:
        single = engine_runs(one.generate(prompts, params, use_tqdm=False))
        formats = set(one.engine.executor.collective_rpc("weight_formats")[0].values())
    with LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **LLM_KW) as llm:
        runs = engine_runs(llm.generate(prompts, params, use_tqdm=False))
        ranks = llm.engine.executor.collective_rpc("weight_formats")
    assert all(set(r.values()) == formats for r in ranks), (formats, ranks)
    assert len(runs) == len(single) == len(PROMPTS)
    for i, (a, b) in enumerate(zip(runs, single)):
        check_parity(a, b, f"bf16 Ray tp=2 vs one process, prompt {i}")
