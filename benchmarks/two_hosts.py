"""Two hosts (network namespaces on a veth link) vs one: output tok/s per layout and backend, communication per step."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                                          # run from a checkout
sys.path.insert(0, os.path.join(ROOT, "tests"))                   # tiny_checkpoints.build_llama_gqa
sys.path.insert(0, os.path.join(ROOT, "tests", "multinode"))      # netns_hosts.two_hosts

NUM_PROMPTS, PROMPT_LEN, OUTPUT_LEN = 8, 16, 32
PROMPTS = [[3 + (97 * i + 13 * j) % 997 for j in range(PROMPT_LEN)] for i in range(NUM_PROMPTS)]
LLM_KW = {"max_model_len": 128, "kv_cache_memory": 4 << 20}
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}
BACKENDS = ("nnodes", "nnodes-gloo", "ray", "ray-cgraph")
MASTER_PORT, PROBE_PORT, RAY_PORT = 29611, 29711, 6379           # inside namespace A: its port space is its own
SECRET = "two-hosts-bench-" + uuid.uuid4().hex
RAY_TOKEN = uuid.uuid4().hex + uuid.uuid4().hex
RUN_TIMEOUT_S = 300
ARGS = argparse.Namespace(repeats=5, sample_seconds=6.0)
NAMESPACES = ""                                                   # "nsA,nsB", set once they exist


# ---- children, run inside a namespace -----------------------------------------------------------------------
def driver(model: str, backend: str, tp: int, pp: int, repeats: int, sample_s: float) -> None:
    """Node 0 / the one host: build the engine, warm up, time `repeats` generate calls; one JSON line out."""
    from shardserve import LLM, SamplingParams
    kw = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, **LLM_KW)
    if backend == "nnodes":
        kw.update(nnodes=2, master_addr=os.environ["SHARDSERVE_HOST_IP"], master_port=MASTER_PORT,
                  distributed_timeout_seconds=120)
    else:
        kw["distributed_executor_backend"] = backend.split("-")[0]     # ray-cgraph: ray, its env set by the parent
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    with LLM(model, **kw) as llm:
        executor, engine = llm.engine.executor, llm.engine
        placement = getattr(executor, "placement", None)
        hosts = ([node.ip for node in placement.nodes for _ in node.ranks] if placement is not None else
                 [getattr(p, "host", "local") for p in executor.procs])
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)        # warm-up
        tok_s, step_ms = [], []
        cpu0, wall0 = cpu_by_process(), time.perf_counter()
        for _ in range(repeats):
            steps, start = engine.num_steps, time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            seconds, steps = time.perf_counter() - start, engine.num_steps - steps
            tok_s.append(sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
            step_ms.append(seconds / steps * 1e3)
        cpu1, wall = cpu_by_process(), time.perf_counter() - wall0
        sampled = sample_ranks(llm, executor.pids, params, sample_s) if sample_s > 0 else None
    cores: dict[str, float] = {}                 # CPU seconds per process kind over the timed runs / their wall time
    for pid, (kind, t1) in cpu1.items():
        kind = "driver" if pid == os.getpid() else kind
        cores[kind] = cores.get(kind, 0.0) + (t1 - cpu0.get(pid, (kind, 0.0))[1]) / wall
    print(json.dumps({"tok_s": tok_s, "step_ms": step_ms, "steps": steps, "hosts": hosts, "cores": cores,
                      "sampled": sampled,
                      "tokens": [list(o.outputs[0].token_ids) for o in outs]}), flush=True)


def sample_ranks(llm, pids: list[int], params, seconds: float, rate: int = 100) -> dict | None:
    """Each rank's main thread sampled by py-spy (idle included, target not paused) while generate runs in a loop:
    ms per engine step inside shardserve/distributed/comm.py (collectives, waits for the peer included), in the
    rest of Worker.execute_model (compute), and elsewhere (waiting for the next command). None without py-spy."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(spy, os.X_OK):
        return None
    folder = tempfile.mkdtemp(prefix="two_hosts_spy_")
    try:
        argv = [spy, "record", "-d", str(max(1, round(seconds))), "-r", str(rate), "--idle", "--threads",
                "--nonblocking", "-f", "raw"]
        procs = [subprocess.Popen([*argv, "-p", str(pid), "-o", f"{folder}/{pid}.txt"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for pid in pids]
        steps, start = llm.engine.num_steps, time.perf_counter()
        while True:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            if all(p.poll() is not None for p in procs):
                break
        step_ms = (time.perf_counter() - start) / (llm.engine.num_steps - steps) * 1e3
        if any(p.returncode != 0 or not os.path.exists(f"{folder}/{pid}.txt") for p, pid in zip(procs, pids)):
            return None
        ranks = []
        for pid in pids:
            counts = {"comm": 0, "compute": 0, "waiting": 0}
            with open(f"{folder}/{pid}.txt") as f:
                for line in f:
                    stack, n = line.rsplit(" ", 1)
                    if not stack.split(";")[0].endswith("MainThread"):
                        continue
                    kind = ("comm" if "shardserve/distributed/comm.py" in stack else
                            "compute" if "Worker.execute_model" in stack else "waiting")
                    counts[kind] += int(n)
            total = sum(counts.values()) or 1
            ranks.append({k: v / total * step_ms for k, v in counts.items()})
        return {"step_ms": step_ms, "ranks": ranks}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) for every process in the benchmark's namespaces (TWO_HOSTS_NETNS)."""
    out = {}
    for i, ns in enumerate(os.environ["TWO_HOSTS_NETNS"].split(",")):
        inode = os.stat(f"/run/netns/{ns}").st_ino
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino != inode:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            host = "AB"[i]
            kind = (f"{host} node agent" if "--headless" in cmd or "ray_agent_process" in cmd else f"{host} ray daemons" if "/ray/" in cmd or
                    "ray::IDLE" in cmd or "raylet" in cmd or "gcs_server" in cmd else f"{host} workers")
            out[int(pid)] = (kind, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


def _mean_us(fn, iters: int, barrier) -> float:
    """Mean µs per call over `iters` back-to-back calls (the mean, not the median: a step pays the slow ones too)."""
    for _ in range(20):
        fn()
    barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def tcp_ping(rank: int, master: str):
    """(ping, close): one raw TCP round trip of 8 bytes between the two probe ranks per ping() call (TCP_NODELAY,
    blocking sockets, Python): the floor any TCP transport pays per round trip here."""
    import socket
    if rank == 0:
        with socket.create_server((master, PROBE_PORT + 1)) as srv:
            sock = srv.accept()[0]
    else:
        for _ in range(200):
            try:
                sock = socket.create_connection((master, PROBE_PORT + 1))
                break
            except OSError:
                time.sleep(0.05)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, buf = b"x" * 8, bytearray(8)

    def recv8():
        got = 0
        while got < 8:
            got += sock.recv_into(memoryview(buf)[got:])

    def ping():
        if rank == 0:
            sock.sendall(msg)
            recv8()
        else:
            recv8()
            sock.sendall(msg)
    return ping, sock.close


def probe(rank: int, tp: int, pp: int, master: str, launch_id: str, host_id: str, shapes: str, iters: int) -> None:
    """One of two ranks timing the collectives a step of this layout runs, at the step's shapes (float32).
    tp: all_reduce [T, hidden] and gather_to_first [S, vocab/tp]; pp: send_tensors/recv_tensors of
    hidden_states + residual [T, hidden], timed as a ping-pong (one way = round trip / 2); "rtt": a raw TCP
    ping-pong. The TP transport is the engine's (SHARDSERVE_TP_TRANSPORT). Every measurement runs in 4 rounds of
    iters/4 calls, interleaved with the others, so load that comes and goes weighs on all alike. Rank 0 prints
    mean µs."""
    import torch
    from shardserve.distributed import comm
    from shardserve.distributed.parallel_state import create_store, destroy_parallel_context, init_parallel_context
    torch.set_num_threads(1)
    ping, close_ping = tcp_ping(rank, master)
    store = create_store(master, PROBE_PORT, 2) if rank == 0 else None
    ctx = init_parallel_context(rank, 2, tp, pp, master_addr=master, master_port=PROBE_PORT, store=store,
                                launch_id=launch_id, host_id=host_id, timeout_s=60,
                                secret=os.environ["SHARDSERVE_SECRET"].encode())
    try:
        group = ctx.tp if tp == 2 else ctx.pp
        barrier = lambda: comm.barrier(group)  # noqa: E731
        calls: dict = {"rtt": ping}
        for item in shapes.split(","):            # "ar:8x64", "ga:8x502", "sr:4x64"
            op, dims = item.split(":")
            x = torch.zeros(*(int(d) for d in dims.split("x")), dtype=torch.float32)
            if op == "ar":
                calls[item] = lambda x=x: comm.all_reduce(x, group)
            elif op == "ga":
                calls[item] = lambda x=x: comm.gather_to_first(x, group)
            else:
                pair, other = {"hidden_states": x, "residual": x.clone()}, 1 - rank

                def ping_pong(pair=pair, other=other):     # a round trip: halved below
                    if rank == 0:
                        comm.send_tensors(pair, other, group)
                        comm.recv_tensors(other, group)
                    else:
                        comm.send_tensors(comm.recv_tensors(other, group), other, group)
                calls[item] = ping_pong
        out: dict = {"transport": "shm" if group.shm else "tcp" if group.net or group.links else "gloo"}
        for _ in range(4):
            for key, fn in calls.items():
                us = _mean_us(fn, max(iters // 4, 1), barrier) / (2 if key.startswith("sr:") else 1)
                out[key] = out.get(key, 0.0) + us / 4
        barrier()
    finally:
        close_ping()
        destroy_parallel_context(ctx)
    if rank == 0:
        print(json.dumps(out), flush=True)


# ---- the parent: namespaces, processes, the table -----------------------------------------------------------
def child_env(ip: str | None, transport: str = "auto") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["SHARDSERVE_TP_TRANSPORT"] = transport                    # TP groups spanning the hosts: TCP or Gloo
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env.update(SHARDSERVE_NUM_THREADS="1", SHARDSERVE_SECRET=SECRET, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN)
    env.pop("SHARDSERVE_HOST_IP", None)
    env["TWO_HOSTS_NETNS"] = NAMESPACES
    if ip:
        env["SHARDSERVE_HOST_IP"] = ip
    return env


def finish(proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S) -> str:
    """stdout of a child that must exit 0; killed (and the error raised) otherwise."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise RuntimeError(f"{what}: no result within {timeout} s\n{err[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: exit {proc.returncode}\n{out[-2000:]}{err[-4000:]}")
    return out


def run_driver(host, model: str, backend: str, tp: int, pp: int, env: dict[str, str]) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "_driver", model, backend, str(tp), str(pp), str(ARGS.repeats),
            str(ARGS.sample_seconds)]
    proc = host.popen(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return json.loads(finish(proc, f"{backend} driver tp={tp} pp={pp}").strip().splitlines()[-1])


def run_side(a, b, model: str, side: str, tp: int, pp: int) -> dict:
    """One driver run of a column of the table: "one" (one host, mp), an nnodes or a Ray backend."""
    if side == "one":
        return run_driver(a, model, "mp", tp, pp, child_env(None))
    if side.startswith("nnodes"):
        return run_nnodes(a, b, model, tp, pp, "gloo" if side == "nnodes-gloo" else "auto")
    env = {**child_env(a.ip), "RAY_ADDRESS": f"{a.ip}:{RAY_PORT}",
           "SHARDSERVE_RAY_COMPILED_DAG": "1" if side == "ray-cgraph" else "0"}
    return run_driver(a, model, side, tp, pp, env)


def merge(into: dict, run: dict) -> None:
    """Pool a run into a column's results: timings concatenated, CPU use summed over runs (divided in report)."""
    if into and into["tokens"] != run["tokens"]:
        into["tokens_differ"] = True
    for key in ("tok_s", "step_ms"):
        into.setdefault(key, []).extend(run[key])
    cores = into.setdefault("cores_sum", {})
    for kind, v in run["cores"].items():
        cores[kind] = cores.get(kind, 0.0) + v
    into["runs"] = into.get("runs", 0) + 1
    into.setdefault("tokens", run["tokens"])
    into["hosts"], into["sampled"] = run["hosts"], run["sampled"] or into.get("sampled")


def run_nnodes(a, b, model: str, tp: int, pp: int, transport: str = "auto") -> dict:
    argv = [sys.executable, "-m", "shardserve.entrypoints.cli", "serve", "--headless", "--nnodes", "2",
            "--node-rank", "1", "--master-addr", a.ip, "--master-port", str(MASTER_PORT),
            "--distributed-timeout-seconds", "120"]
    node1 = b.popen(argv, child_env(b.ip, transport), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        got = run_driver(a, model, "nnodes", tp, pp, child_env(a.ip, transport))
        finish(node1, "headless node 1", timeout=60)
        return got
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.communicate(timeout=30)


def run_probe(first, second, master: str, tp: int, pp: int, shapes: list[str], iters: int, same_host: bool,
              transport: str = "auto") -> dict:
    launch = uuid.uuid4().hex[:8]
    procs = []
    for rank, host in enumerate((first, second)):
        host_id = "one-host" if same_host else host.ip
        argv = [sys.executable, os.path.abspath(__file__), "_probe", str(rank), str(tp), str(pp), master, launch,
                host_id, ",".join(shapes), str(iters)]
        # GLOO_SOCKET_IFNAME as the executors set it
        env = {**child_env(None, transport), "GLOO_SOCKET_IFNAME": "lo" if same_host else host.ifname}
        procs.append(host.popen(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [finish(p, f"probe rank {r}", timeout=120) for r, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    return json.loads(outs[0].strip().splitlines()[-1])


def start_ray(a, b, tag: str) -> list[str]:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "1", "--object-store-memory", "200000000", "--disable-usage-stats"]
    dirs = [f"/tmp/rA{tag}", f"/tmp/rB{tag}"]
    for host, argv in ((a, [ray_bin, "start", "--head", "--node-ip-address", a.ip, "--port", str(RAY_PORT),
                            "--include-dashboard", "false", "--temp-dir", dirs[0], *common]),
                       (b, [ray_bin, "start", "--address", f"{a.ip}:{RAY_PORT}", "--node-ip-address", b.ip,
                            "--temp-dir", dirs[1], *common])):
        proc = host.run(argv, env=child_env(host.ip), check=False, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` failed in {host.ns}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return dirs


def comm_shapes(cfg: dict, tp: int, pp: int) -> dict[str, list[tuple[str, int]]]:
    """Per engine step of each phase: [(probe key, count)]. A step carries ceil(prompts / pp) sequences
    (the scheduler fills pp batches); prefill carries their whole prompts."""
    hidden, layers, seqs = cfg["hidden_size"], cfg["num_hidden_layers"], math.ceil(NUM_PROMPTS / pp)
    out = {}
    for phase, tokens in (("decode", seqs), ("prefill", seqs * PROMPT_LEN)):
        if tp > 1:      # embedding all-reduce + 2 per layer (o_proj, down_proj), then the LM-head gather
            out[phase] = [(f"ar:{tokens}x{hidden}", 2 * layers + 1),
                          (f"ga:{seqs}x{math.ceil(cfg['vocab_size'] / tp)}", 1)]
        else:           # one hand-off of hidden_states + residual per stage boundary
            out[phase] = [(f"sr:{tokens}x{hidden}", pp - 1)]
    return out


def main() -> None:
    global ARGS, NAMESPACES
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layouts", default="tp2,pp2", help="comma-separated subset of " + ",".join(LAYOUTS))
    ap.add_argument("--backends", default="nnodes-gloo,nnodes,ray,ray-cgraph",
                    help="two-host backends: nnodes (TP across the hosts over the TCP collectives), nnodes-gloo (the "
                         "same over Gloo: SHARDSERVE_TP_TRANSPORT=gloo), ray (Ray places, the engine drives), "
                         "ray-cgraph (Ray compiled graphs: SHARDSERVE_RAY_COMPILED_DAG=1); the Ray ones are skipped "
                         "if Ray is not installed")
    ap.add_argument("--repeats", type=int, default=5, help="timed generate calls per run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of every column, interleaved (the median over all their timed calls is reported)")
    ap.add_argument("--probe-iters", type=int, default=400)
    ap.add_argument("--sample-seconds", type=float, default=6.0,
                    help="py-spy sampling of every rank after the timed runs (0: skip; skipped without py-spy)")
    ARGS = args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    backends = [x for x in args.backends.split(",") if x]
    if unknown := [x for x in layouts if x not in LAYOUTS] + [x for x in backends
                                                               if x not in BACKENDS]:
        sys.exit(f"unknown layout/backend {unknown}")
    if importlib.util.find_spec("ray") is None and any(b.startswith("ray") for b in backends):
        print("ray is not installed: skipping the Ray backends", flush=True)
        backends = [b for b in backends if not b.startswith("ray")]

    import netns_hosts as netns
    from tiny_checkpoints import build_llama_gqa
    if reason := netns.available():
        sys.exit(f"two_hosts.py: {reason}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))          # so the finally blocks below run
    with open("/proc/loadavg") as f:
        print(f"load average before: {' '.join(f.read().split()[:3])}", flush=True)

    tmp, tag, ray_dirs = tempfile.mkdtemp(prefix="two_hosts_"), uuid.uuid4().hex[:6], []
    results: dict[str, dict] = {name: {} for name in layouts}
    try:
        model = build_llama_gqa(os.path.join(tmp, "llama_gqa"))
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        with netns.two_hosts() as (a, b):
            NAMESPACES = f"{a.ns},{b.ns}"
            if any(x.startswith("ray") for x in backends):   # first: its daemons then weigh on every run alike
                ray_dirs = start_ray(a, b, tag)
            for round_ in range(args.rounds):                # interleaved, so load that drifts weighs on all
                for name in layouts:
                    tp, pp = LAYOUTS[name]
                    for side in ("one", *backends):
                        got = run_side(a, b, model, side, tp, pp)
                        merge(results[name].setdefault(side, {}), got)
                        print(f"round {round_ + 1} {name} {side}: {statistics.median(got['tok_s']):.1f} tok/s "
                              f"ranks on {got['hosts']}", flush=True)
            for name in layouts:
                tp, pp = LAYOUTS[name]
                res = results[name]
                shapes = comm_shapes(cfg, tp, pp)
                keys = sorted({k for phase in shapes.values() for k, _ in phase})
                res["shapes"] = shapes
                res["probe_one"] = run_probe(a, a, "127.0.0.1", tp, pp, keys, args.probe_iters, same_host=True)
                res["probe_gloo"] = run_probe(a, b, a.ip, tp, pp, keys, args.probe_iters, same_host=False,
                                              transport="gloo")
                res["probe_two"] = run_probe(a, b, a.ip, tp, pp, keys, args.probe_iters, same_host=False)
                print(f"{name} probe, mean µs: one host {res['probe_one']}, two hosts over Gloo {res['probe_gloo']}, "
                      f"two hosts {res['probe_two']}", flush=True)
    finally:                      # two_hosts() has killed every process in both namespaces and deleted them
        shutil.rmtree(tmp, ignore_errors=True)
        if ray_dirs:
            netns.forget_ray_cluster(netns.SUBNET_IPS[0])
        for d in ray_dirs:
            shutil.rmtree(d, ignore_errors=True)
    with open("/proc/loadavg") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")
    report(results, backends)


def report(results: dict[str, dict], backends: list[str]) -> None:
    sides = ["one", *backends]
    label = {"one": "one host (mp)", "nnodes": "two hosts, nnodes", "nnodes-gloo": "two hosts, nnodes over Gloo",
             "ray": "two hosts, Ray", "ray-cgraph": "two hosts, Ray compiled graph"}
    med = statistics.median
    print(f"\n{NUM_PROMPTS} prompts x {PROMPT_LEN} tokens, {OUTPUT_LEN} output tokens, greedy, one thread per rank; "
          f"{ARGS.rounds} interleaved runs of each column (Ray's daemons up throughout when a Ray column is asked "
          f"for), median of their {ARGS.rounds * ARGS.repeats} timed generate calls; ms/step = wall time / engine "
          "steps")
    print("| layout | " + " | ".join(f"{label[s]} tok/s (ms/step)" for s in sides) +
          " | collectives per decode step, probe: one host -> two hosts over Gloo -> two hosts (their transport) |")
    print("|---|" + "---:|" * len(sides) + "---|")
    for name, res in results.items():
        one = med(res["one"]["tok_s"])
        row = f"| {name} |"
        for side in sides:
            t = med(res[side]["tok_s"])
            ratio = "" if side == "one" else f", {t / one:.2f}x"
            row += f" {t:.0f} ({med(res[side]['step_ms']):.2f} ms{ratio}) |"
            if res[side]["tokens"] != res["one"]["tokens"] or res[side].get("tokens_differ"):
                row = row[:-1] + "TOKENS DIFFER |"
        probes = ("probe_one", "probe_gloo", "probe_two")
        totals = [sum(res[s][k] * n for k, n in res["shapes"]["decode"]) / 1e3 for s in probes]
        detail = " + ".join(f"{n} x {k} " + " -> ".join(f"{res[s][k]:.0f}" for s in probes) + " µs"
                            for k, n in res["shapes"]["decode"])
        print(row + " " + " -> ".join(f"{t:.2f}" for t in totals) + f" ms ({detail}; transports "
              + " -> ".join(res[s]["transport"] for s in probes) + "; raw TCP round trip "
              + " -> ".join(f"{res[s]['rtt']:.0f}" for s in probes) + " µs) |")
    if any(res[s].get("sampled") for res in results.values() for s in sides):
        print("\nin situ, per engine step (py-spy samples of each rank's main thread during a further "
              f"{ARGS.sample_seconds:g} s of generate): ms in comm.py / compute / waiting for the next command")
        for name, res in results.items():
            for side in sides:
                got = res[side].get("sampled")
                if got:
                    ranks = "; ".join(f"rank {r}: {x['comm']:.2f} / {x['compute']:.2f} / {x['waiting']:.2f}"
                                      for r, x in enumerate(got["ranks"]))
                    print(f"  {name} {label[side]}: step {got['step_ms']:.2f} ms; {ranks}")
    print(f"\nCPU use over the timed runs, in cores (CPU seconds / wall seconds; {os.cpu_count()} cores):")
    for name, res in results.items():
        for side in sides:
            mean = {k: v / res[side]["runs"] for k, v in res[side]["cores_sum"].items()}
            cores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(mean.items()))
            print(f"  {name} {label[side]}: total {sum(mean.values()):.2f} = {cores}")
    print("\ncollectives per prefill step, probe (ms, one host -> two hosts over Gloo -> two hosts):")
    for name, res in results.items():
        totals = (sum(res[s][k] * n for k, n in res["shapes"]["prefill"]) / 1e3
                  for s in ("probe_one", "probe_gloo", "probe_two"))
        print(f"  {name}: " + " -> ".join(f"{t:.2f}" for t in totals) + f" ({res['shapes']['prefill']})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_driver":
        driver(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_probe":
        probe(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7],
              sys.argv[8], int(sys.argv[9]))
    else:
        main()
