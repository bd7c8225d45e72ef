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
    """A Ray head in namespace A and a Ray worker node in namespace B (2 CPUs each); killed by namespace pids."""
    reason = netns.available()
    if reason:
        pytest.skip(f"two-host Ray test: {reason}")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "2", "--object-store-memory", "200000000", "--disable-usage-stats"]
    tag = uuid.uuid4().hex[:6]
    with netns.two_hosts() as (a, b):
        _start(a, [ray_bin, "start", "--head", "--node-ip-address", a.ip, "--port", str(RAY_PORT),
                   "--include-dashboard", "false", "--temp-dir", f"/tmp/rA{tag}", *common])
        _start(b, [ray_bin, "start", "--address", f"{a.ip}:{RAY_PORT}", "--node-ip-address", b.ip,
                   "--temp-dir", f"/tmp/rB{tag}", *common])
        try:
            yield a, b
        finally:
            netns.forget_ray_cluster(a.ip)


def _start(host: netns.Host, argv: list[str]) -> None:
    proc = host.run(argv, env=_env(host), check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} failed in {host.ns}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def run_driver(host: netns.Host, model: str, tp: int, pp: int, mode: str = "generate", timeout_s: float = 60,
               **env: str) -> tuple[int, dict | str]:
    """The driver script below, run in `host`: (exit status, its JSON line, or its stderr when it failed)."""
    env = {**_env(host), "RAY_ADDRESS": f"{host.ip}:{RAY_PORT}", **env}
    argv = [sys.executable, os.path.abspath(__file__), model, str(tp), str(pp), mode, str(timeout_s)]
    proc = host.run(argv, env=env, timeout=DRIVER_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        return proc.returncode, proc.stdout[-3000:] + proc.stderr[-6000:]
    return 0, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,pp,mode", [(2, 1, "spread"), (1, 2, "spread"), (2, 2, "generate")],
                         ids=["tp2-one-rank-per-host", "pp2-one-stage-per-host", "tp2xpp2-two-ranks-per-host"])
def test_two_hosts_match_single_process(ray_cluster, llama_gqa, reference, tp, pp, mode):
    """Ray places the ranks on both hosts ("spread": one CPU of each is taken first, so two ranks cannot pack onto
    one), the engine drives them over its own channel: the tokens of one process."""
    a, b = ray_cluster
    status, got = run_driver(a, llama_gqa, tp, pp, mode)
    assert status == 0, got
    assert got["tokens"] == reference
    per_host = tp * pp // 2
    assert sorted(got["node_ips"]) == sorted([a.ip] * per_host + [b.ip] * per_host), got
    assert got["far_ranks"] == per_host and got["agents"] == 1, got      # one agent process runs host B's ranks
    assert got["nice"] == [0] * (tp * pp), got                           # not Ray's nice 15


@pytest.mark.timeout(300)
def test_two_hosts_killed_far_rank_fails_within_10s_and_leaves_nothing(ray_cluster, llama_gqa):
    """kill -9 of the rank on host B during generate: a WorkerError naming it within 10 s, and once the driver has
    exited, no worker, agent or rank actor of the launch is left on either host."""
    a, _ = ray_cluster
    status, got = run_driver(a, llama_gqa, 1, 2, "kill")
    assert status == 0, got
    assert "rank 1 on node 1 (10.213.7.2" in got["error"] and "was killed by signal 9" in got["error"], got
    assert got["seconds_to_error"] < 10, got
    deadline = time.monotonic() + 20
    while (alive := [p for p in got["pids"] if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"left running after the driver exited: {alive} of {got['pids']}"


@pytest.mark.timeout(300)
def test_two_hosts_unreachable_control_port_names_node_address_and_port(ray_cluster, llama_gqa):
    """Host A's answers from the driver's control port go nowhere (a policy-routing blackhole for its TCP source
    port: a firewall that drops host B's connections). The launch fails within the distributed timeout with an
    error naming host B, the driver's address and port, and nothing of it is left running."""
    a, b = ray_cluster
    port = 29655
    rule = ["ip", "-n", a.ns, "rule", "add", "ipproto", "tcp", "sport", str(port), "blackhole"]
    subprocess.run(rule, check=True, capture_output=True)
    try:
        start = time.monotonic()
        status, err = run_driver(a, llama_gqa, 1, 2, "spread", timeout_s=8, SHARDSERVE_PORT=str(port))
        elapsed = time.monotonic() - start
    finally:
        subprocess.run(["ip", "-n", a.ns, "rule", "del", "ipproto", "tcp", "sport", str(port), "blackhole"],
                       capture_output=True)
    assert status != 0, err
    assert f"the Ray node at {b.ip} could not join the driver's control port {a.ip}:{port}" in err, err
    assert elapsed < 60, elapsed
    assert not _launch_processes(a, b), _launch_processes(a, b)


@pytest.mark.timeout(120)
def test_two_hosts_missing_auth_token_is_a_clear_error(ray_cluster, llama_gqa):
    """A driver without the cluster's RAY_AUTH_TOKEN is told what to set, before anything starts."""
    a, _ = ray_cluster
    status, err = run_driver(a, llama_gqa, 1, 2, "generate", RAY_AUTH_TOKEN="", RAY_AUTH_MODE="")
    assert status != 0, err
    assert f"cannot join the Ray cluster at RAY_ADDRESS={a.ip}:{RAY_PORT}" in err, err[-3000:]     # ours, not Ray's
    assert "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in err, err[-3000:]


def _launch_processes(*hosts: netns.Host) -> list[str]:
    """Command lines of the agent or worker processes (spawned by multiprocessing) still running on the hosts."""
    out = []
    for pid in (p for h in hosts for p in h.pids()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ("ray_agent_process" in cmd or "multiprocessing.spawn" in cmd) and _running(pid):
            out.append(f"{pid}: {cmd}")
    return out


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
def test_dead_rank_is_a_worker_error_naming_it(llama_gqa):
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


def _driver_main(model: str, tp: int, pp: int, mode: str, timeout_s: float) -> dict:
    """Run inside namespace A. mode: "generate"; "spread" (one CPU of every node taken first, so the ranks spread
    over the hosts); "kill" (kill -9 the last rank, on host B, during generate; report the error)."""
    import threading
    from shardserve import LLM, SamplingParams
    from shardserve.executor.base import WorkerError
    if mode in ("spread", "kill"):
        ray.init(logging_level="warning")
        filler = ray.util.placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
        ray.get(filler.ready(), timeout=60)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out: dict = {}
    with LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="ray",
             distributed_timeout_seconds=timeout_s, **LLM_KW) as llm:
        executor = llm.engine.executor
        out["node_ips"] = [node.ip for node in executor.placement.nodes for _ in node.ranks]
        out["far_ranks"] = sum(hasattr(p, "host") for p in executor.procs)          # RemoteRank: another node's
        out["agents"] = len(executor.launch.links)
        out["pids"] = [*executor.pids, *(link.agent_pid for link in executor.launch.links), *executor.placement.pids]
        out["nice"] = [os.getpriority(os.PRIO_PROCESS, pid) for pid in executor.pids]      # Ray's workers: 15
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        out["seconds"] = time.perf_counter() - start
        out["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        if mode == "kill":
            killed = []
            threading.Timer(1.0, lambda: (killed.append(time.monotonic()),
                                          os.kill(executor.pids[-1], 9))).start()
            long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
            try:
                while True:
                    llm.generate([{"prompt_token_ids": p} for p in PROMPTS * 8], long, use_tqdm=False)
            except WorkerError as exc:
                out["seconds_to_error"], out["error"] = time.monotonic() - killed[0], str(exc)
    return out


if __name__ == "__main__":      # the driver, run inside namespace A: what it saw as one JSON line
    print(json.dumps(_driver_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))))


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
