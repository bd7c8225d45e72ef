"""TP across two hosts (network namespaces on a veth pair, root only) on the TCP collectives: tp=2 x pp=2 over four
nodes matches one process; a firewall on the transport's port is a clear error naming the node, address and port
within the distributed timeout, with nothing left on either host; kill -9 of the far rank mid-step fails within 10 s.
Node 0's engine runs test_nnodes.py's driver (its __main__) inside namespace A."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_hosts as netns  # noqa: E402
from launch_helpers import all_gone, child_env, follow_stdout, headless_argv, wait_for_line  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = "tcp-two-hosts-secret-" + os.urandom(8).hex()
MASTER_PORT = 29611                      # test_nnodes.py's driver uses this port, inside namespace A
COLL_PORT = 29811                        # SHARDSERVE_COLLECTIVES_PORT: rank 0 (node 0, host A) listens here
EXTRA_IPS = ("10.213.7.3", "10.213.7.4")  # a second node address on A and on B


def _env(host_ip: str, **extra: str) -> dict[str, str]:
    return child_env(host_ip, SECRET, 4, **extra)


def _headless(host: netns.Host, ip: str, master: str, nnodes: int, node_rank: int, timeout_s: float = 60,
              **extra: str) -> subprocess.Popen:
    argv = headless_argv(master, MASTER_PORT, timeout_s, nnodes, node_rank)
    return host.popen(argv, _env(ip, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _driver(host: netns.Host, model: str, tp: int, pp: int, mode: str, nnodes: int = 2,
            timeout_s: float = 120, **extra: str) -> subprocess.Popen:
    argv = [sys.executable, os.path.join(HERE, "test_nnodes.py"), model, str(tp), str(pp), host.ip, mode]
    env = _env(host.ip, TEST_NNODES=str(nnodes), TEST_TIMEOUT_S=str(timeout_s), **extra)
    return host.popen(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def hosts():
    reason = netns.available()
    if reason:
        pytest.skip(f"two-host test: {reason}")
    with netns.two_hosts() as (a, b):
        for h, ip in zip((a, b), EXTRA_IPS):
            subprocess.run(["ip", "-n", h.ns, "addr", "add", f"{ip}/24", "dev", h.ifname], check=True)
        yield a, b


@pytest.fixture(scope="module")
def reference(llama_gqa) -> list[list[int]]:
    from test_nnodes import LLM_KW, greedy

    from shardserve import LLM
    with LLM(llama_gqa, **LLM_KW) as llm:
        return greedy(llm)


@pytest.mark.timeout(300)
def test_tp2_x_pp2_over_four_nodes_on_two_hosts(hosts, llama_gqa, reference):
    """Nodes 0 and 2 on host A, 1 and 3 on host B: both TP groups ([0, 1], [2, 3]) span the hosts."""
    a, b = hosts
    nodes = [_headless(h, ip, a.ip, 4, r) for r, h, ip in ((1, b, b.ip), (2, a, EXTRA_IPS[0]), (3, b, EXTRA_IPS[1]))]
    try:
        driver = _driver(a, llama_gqa, 2, 2, "once", nnodes=4)
        out, err = driver.communicate(timeout=240)
        assert driver.returncode == 0, out[-3000:] + err[-6000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["tokens"] == reference
        assert got["hosts"] == [a.ip, b.ip, EXTRA_IPS[0], EXTRA_IPS[1]]
        assert got["transports"] == ["tcp"] * 4
        assert got["pp_transports"] == ["tcp"] * 4            # every stage's neighbour is on another node
        for node in nodes:
            assert node.wait(timeout=30) == 0
    finally:
        _stop(*nodes)
    assert not all_gone(a, b)


@pytest.mark.timeout(180)
def test_firewall_on_the_transport_port_is_named_within_the_timeout(hosts, llama_gqa):
    """Host A's answers from rank 0's collectives port go nowhere (a policy-routing blackhole for TCP source port
    COLL_PORT: host B's connection attempts time out as behind a firewall that drops them; no netfilter needed)."""
    a, b = hosts
    rule = ["ip", "-n", a.ns, "rule", "add", "ipproto", "tcp", "sport", str(COLL_PORT), "blackhole"]
    subprocess.run(rule, check=True, capture_output=True)
    timeout_s = 8
    try:
        node1 = _headless(b, b.ip, a.ip, 2, 1, timeout_s=timeout_s, SHARDSERVE_COLLECTIVES_PORT=str(COLL_PORT))
        try:
            start = time.monotonic()
            driver = _driver(a, llama_gqa, 2, 1, "once", timeout_s=timeout_s,
                             SHARDSERVE_COLLECTIVES_PORT=str(COLL_PORT))
            out, err = driver.communicate(timeout=120)
            elapsed = time.monotonic() - start
            assert driver.returncode != 0, out[-2000:]
            want = f"cannot reach rank 0 on node {a.ip} at {a.ip}:{COLL_PORT} within {timeout_s} s"
            assert want in err, err[-5000:]
            assert elapsed < timeout_s + 25, f"reported after {elapsed:.1f} s"      # start-up + the timeout
            print(f"firewall reported after {elapsed:.1f} s: ...{err[err.index(want) - 80:][:300]}")
            node1.wait(timeout=30)
        finally:
            _stop(node1)
    finally:
        subprocess.run([*rule[:4], "del", *rule[5:]], capture_output=True)
    assert not all_gone(a, b), "processes left running after the failed start"
    for h in (a, b):                                                     # no listener left on the port either
        assert f":{COLL_PORT} " not in h.run(["ss", "-Htan"]).stdout


@pytest.mark.timeout(300)
def test_kill_9_of_the_far_rank_mid_step_fails_within_10_s(hosts, llama_gqa):
    a, b = hosts
    node1 = _headless(b, b.ip, a.ip, 2, 1)
    driver = _driver(a, llama_gqa, 2, 1, "loop")
    try:
        lines, reader = follow_stdout(driver)
        wait_for_line(driver, lines, "ROUND 2")                          # generating across the link
        workers = [p for p in b.pids() if p != node1.pid and b"spawn_main" in _cmdline(p)]
        assert len(workers) == 1, [(p, _cmdline(p)) for p in b.pids()]
        os.kill(workers[0], 9)
        killed = time.monotonic()
        driver.wait(timeout=60)
        reported = time.monotonic() - killed
        reader.join(timeout=10)
        failure = next((line for line in lines if line.startswith("FAILED")), "")
        assert driver.returncode == 3 and ("rank 1 (10.213.7.2:" in failure or "rank 1 on node 1" in failure), (
            lines[-3:], driver.stderr.read()[-3000:])
        assert reported < 10, f"reported after {reported:.1f} s"
        print(f"kill -9 reported after {reported:.2f} s: {failure.strip()[-400:]}")
        node1.wait(timeout=30)
    finally:
        _stop(driver, node1)
    assert not all_gone(a, b), "processes left running after the kill"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
