"""--nnodes without Ray: node 0 runs the engine, `serve --headless` nodes run their ranks.

Two-host tests run node 0 and node 1 in two network namespaces joined by a veth pair (root only): tp=2 with
one rank per host and pp=2 with one stage per host equal one process, and a cut link is reported within the
heartbeat timeout with nothing left running. Loopback tests (any user) put the "nodes" on 127.0.0.1 and
127.0.0.2 and check parity plus every start-up failure: wrong secret, a node that never joins, no master,
two nodes with one address.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_hosts as netns  # noqa: E402
from launch_helpers import all_gone, child_env, follow_stdout, headless_argv, wait_for_line  # noqa: E402

PROMPTS = [[1, 5, 9, 200], [7, 8, 9], [300, 301, 302, 303, 304, 305]]
MAX_TOKENS = 8
LLM_KW = {"max_model_len": 128, "kv_cache_memory": 4 << 20}
SECRET = "nnodes-test-secret-" + os.urandom(8).hex()
HEARTBEAT_S = 4
MASTER_PORT = 29611              # inside namespace A, whose port space is its own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(host_ip: str, secret: str = SECRET) -> dict[str, str]:
    return child_env(host_ip, secret, HEARTBEAT_S)


def greedy(llm) -> list[list[int]]:
    from shardserve import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def reference(llama_gqa) -> list[list[int]]:
    from shardserve import LLM
    with LLM(llama_gqa, **LLM_KW) as llm:
        return greedy(llm)


@contextlib.contextmanager
def headless(argv: list[str], env: dict[str, str], popen=subprocess.Popen):
    proc = popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


# ---- loopback: two "nodes" on 127.0.0.1 and 127.0.0.2 ------------------------------------------------------
@pytest.fixture
def node0_env(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_SECRET", SECRET)
    monkeypatch.setenv("SHARDSERVE_HEARTBEAT_TIMEOUT", str(HEARTBEAT_S))
    monkeypatch.delenv("SHARDSERVE_HOST_IP", raising=False)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_loopback_two_nodes_match_one_process(llama_gqa, reference, node0_env, tp, pp):
    from shardserve import LLM
    from shardserve.executor.node_link import RemoteRank
    port = _free_port()
    with headless(headless_argv("127.0.0.1", port), _env("127.0.0.2")) as node1:
        with LLM(llama_gqa, tensor_parallel_size=tp, pipeline_parallel_size=pp, nnodes=2, master_addr="127.0.0.1",
                 master_port=port, **LLM_KW) as llm:
            remote = [p for p in llm.engine.executor.procs if isinstance(p, RemoteRank)]
            assert [r.rank for r in remote] == list(range(tp * pp // 2, tp * pp)) and remote[0].host == "127.0.0.2"
            assert greedy(llm) == reference
        assert node1.wait(timeout=30) == 0
        assert "node 0 ended the launch" in node1.stderr.read()


@pytest.mark.timeout(120)
def test_wrong_secret_is_named_on_both_sides(llama_gqa, node0_env):
    from shardserve import LLM
    port = _free_port()
    with headless(headless_argv("127.0.0.1", port), _env("127.0.0.2", secret="not-the-launch-secret!")) as node1:
        with pytest.raises(ValueError, match=r"node\(s\) \[1\] did not join .*refused for a wrong secret"):
            LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1", master_port=port,
                distributed_timeout_seconds=4, **LLM_KW)
        assert node1.wait(timeout=30) == 2
        assert "rejected this process's secret" in node1.stderr.read()


@pytest.mark.timeout(120)
def test_two_nodes_with_one_address_is_an_error(llama_gqa, node0_env):
    from shardserve import LLM
    port = _free_port()
    with headless(headless_argv("127.0.0.1", port), _env("127.0.0.1")) as node1:
        with pytest.raises(ValueError, match="nodes 0 and 1 both advertise the address 127.0.0.1; set SHARDSERVE_HOST_IP"):
            LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1", master_port=port,
                distributed_timeout_seconds=20, **LLM_KW)
        assert node1.wait(timeout=30) != 0           # node 0 hung up on it: it stops, nothing keeps running


@pytest.mark.timeout(60)
def test_node_that_never_joins_and_master_that_never_answers(llama_gqa, node0_env):
    from shardserve import LLM
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"node\(s\) \[1\] did not join 127.0.0.1:\d+ within 2 s"):
        LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1", master_port=port,
            distributed_timeout_seconds=2, **LLM_KW)
    assert time.monotonic() - start < 20
    proc = subprocess.run(headless_argv("127.0.0.1", port, timeout_s=2), env=_env("127.0.0.2"), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "no master reachable" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr


@pytest.mark.timeout(60)
def test_layout_and_flag_errors(llama_gqa, node0_env, monkeypatch):
    from shardserve import LLM
    with pytest.raises(ValueError, match="3 ranks cannot be spread evenly over nnodes=2"):
        LLM(llama_gqa, tensor_parallel_size=3, nnodes=2, master_addr="127.0.0.1", **LLM_KW)
    with pytest.raises(ValueError, match="needs master_addr"):
        LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, **LLM_KW)
    with pytest.raises(ValueError, match="--headless"):
        LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, node_rank=1, master_addr="127.0.0.1", **LLM_KW)
    with pytest.raises(ValueError, match="Ray spans nodes itself"):
        LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1", distributed_executor_backend="ray",
            **LLM_KW)
    monkeypatch.delenv("SHARDSERVE_SECRET")
    with pytest.raises(ValueError, match="SHARDSERVE_SECRET"):
        LLM(llama_gqa, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1", **LLM_KW)
    env = _env("127.0.0.2")
    del env["SHARDSERVE_SECRET"]
    proc = subprocess.run(headless_argv("127.0.0.1", 1), env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "needs SHARDSERVE_SECRET" in proc.stderr


# ---- two network namespaces -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hosts():
    reason = netns.available()
    if reason:
        pytest.skip(f"two-host test: {reason}")
    with netns.two_hosts() as pair:
        yield pair


def _driver(host: netns.Host, model: str, tp: int, pp: int, mode: str) -> subprocess.Popen:
    argv = [sys.executable, os.path.abspath(__file__), model, str(tp), str(pp), host.ip, mode]
    return host.popen(argv, _env(host.ip), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp,transport,pp_transport", [(2, 1, "tcp", "none"), (1, 2, "none", "tcp"),
                                                          (4, 1, "tcp+shm", "none")],
                         ids=["tp2-one-rank-per-host", "pp2-one-stage-per-host", "tp4-two-ranks-per-host"])
def test_two_hosts_match_single_process(hosts, llama_gqa, reference, tp, pp, transport, pp_transport):
    """TP across the hosts runs on the TCP collectives (with shared memory inside a host holding two ranks), and a
    hand-off between stages on different hosts on a TCP link."""
    a, b = hosts
    node1 = b.popen(headless_argv(a.ip, MASTER_PORT), _env(b.ip), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        driver = _driver(a, llama_gqa, tp, pp, "once")
        out, err = driver.communicate(timeout=240)
        assert driver.returncode == 0, out[-3000:] + err[-6000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["tokens"] == reference
        half = tp * pp // 2
        assert got["hosts"] == [a.ip] * half + [b.ip] * half     # the first ranks on host A, the others on B
        assert got["transports"] == [transport] * (tp * pp)
        assert got["pp_transports"] == [pp_transport] * (tp * pp)
        assert got["direct_replies"] == (pp == 2)        # the output rank is on host B: it answers node 0 directly
        assert got["direct_commands"] == [half == 1]      # host B's one rank takes its commands from node 0 directly
        assert node1.wait(timeout=30) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.communicate(timeout=30)
    assert not all_gone(a, b)


@pytest.mark.timeout(300)
def test_cut_link_is_reported_within_the_heartbeat_timeout(hosts, llama_gqa):
    a, b = hosts
    node1 = b.popen(headless_argv(a.ip, MASTER_PORT), _env(b.ip), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    driver = _driver(a, llama_gqa, 2, 1, "loop")
    try:
        lines, reader = follow_stdout(driver)
        wait_for_line(driver, lines, "ROUND 2")                         # generating across the link
        launch_id = next(l.split()[1] for l in lines if l.startswith("LAUNCH"))
        b.set_link(up=False)
        cut = time.monotonic()
        driver.wait(timeout=HEARTBEAT_S + 30)
        reported = time.monotonic() - cut
        reader.join(timeout=10)
        failure = next((l for l in lines if l.startswith("FAILED")), "")
        assert driver.returncode == 3 and "rank 1 on node 1" in failure and "heartbeat" in failure, lines[-3:]
        assert reported < HEARTBEAT_S + 10, f"the cut was reported after {reported:.1f} s"
        print(f"link cut reported after {reported:.1f} s (heartbeat timeout {HEARTBEAT_S} s): {failure.strip()}")
        node1.wait(timeout=HEARTBEAT_S + 30)                  # node 1 notices too, stops its worker, exits
        assert node1.returncode == 1 and "no heartbeat from node 0" in node1.stderr.read()
        assert not all_gone(a, b), "processes left running after the cut"
        assert not [n for n in os.listdir("/dev/shm") if launch_id in n]
    finally:
        b.set_link(up=True)
        for proc in (driver, node1):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


if __name__ == "__main__":      # node 0's driver, run inside namespace A
    model, tp, pp, host_ip, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    from shardserve import LLM
    from shardserve.distributed.secure_channel import Channel
    from shardserve.executor.base import WorkerError
    llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, nnodes=int(os.environ.get("TEST_NNODES", 2)),
              master_addr=host_ip, master_port=MASTER_PORT,
              distributed_timeout_seconds=float(os.environ.get("TEST_TIMEOUT_S", 120)), **LLM_KW)
    executor = llm.engine.executor
    print("LAUNCH", executor.launch.launch_id, flush=True)
    if mode == "once":
        with llm:
            tokens = greedy(llm)
            hosts = [getattr(p, "host", host_ip) for p in executor.procs]
            transports = executor.collective_rpc("tp_transport")
            pp_transports = executor.collective_rpc("pp_transport")
            direct = isinstance(executor.conns[executor.output_rank], Channel)    # its own connection to us
            commands = [link.direct is not None for link in executor.launch.links]
        print(json.dumps({"tokens": tokens, "hosts": hosts, "transports": transports, "pp_transports": pp_transports,
                          "direct_replies": direct, "direct_commands": commands}))
        sys.exit(0)
    try:
        for i in range(1, 1_000_000):
            greedy(llm)
            print("ROUND", i, flush=True)
    except WorkerError as exc:
        print("FAILED", str(exc).replace("\n", " "), flush=True)
        llm.shutdown()
        sys.exit(3)
