"""External launchers (torchrun, mpirun) run examples/torchrun_generate.py SPMD: every rank matches one process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from shardserve import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "torchrun_generate.py")
PROMPTS = ["hello world", "the sea is blue and", "a b c"]
MAX_TOKENS = 6
MAX_MODEL_LEN = 128
KV_BYTES = 4 << 20
FLAGS = ["--max-tokens", str(MAX_TOKENS), "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", str(KV_BYTES)]
RUN_TIMEOUT_S = 240
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SHARDSERVE_PORT", "PMI_RANK", "PMI_SIZE")


def free_port_pair() -> int:
    """A port P with P and P + 1 both free (torchrun's agent takes P, shardserve's store P + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of adjacent ports")


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher variables, with the repo on PYTHONPATH, plus `extra`."""
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("OMPI_COMM_WORLD")}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    out.update(extra)
    return out


def run_group(cmd: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    """Run cmd in its own process group; (exit code, stdout+stderr). On timeout or any failure the whole
    group is stopped (SIGTERM, then SIGKILL) by its id."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            _kill_group(proc)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of pid (torchrun starts its ranks in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the launcher's process group and every process it started, by id: SIGTERM, then SIGKILL."""
    children = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill in [lambda: os.killpg(proc.pid, sig)] + [lambda c=c: os.kill(c, sig) for c in children]:
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def reference(llama_gqa) -> list[list[int]]:
    """One process, no launcher: greedy token ids per prompt."""
    with LLM(llama_gqa, max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_BYTES) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def check_ranks(out_dir: str, world: int, reference: list[list[int]], log: str) -> None:
    records = []
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        assert os.path.exists(path), f"rank {rank} wrote no output\n{log[-4000:]}"
        with open(path) as f:
            records.append(json.load(f))
    for rank, recs in enumerate(records):
        assert [r["rank"] for r in recs] == [rank] * len(PROMPTS)
        assert [r["prompt"] for r in recs] == PROMPTS
        assert [(r["token_ids"], r["text"]) for r in recs] == [(r["token_ids"], r["text"]) for r in records[0]], \
            f"rank {rank} disagrees with rank 0"
    assert [r["token_ids"] for r in records[0]] == reference, "launcher run differs from one process"


def torchrun_cmd(port: int, nproc: int, model: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), EXAMPLE, "--model", model, *args]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_torchrun(tp, pp, llama_gqa, reference, tmp_path):
    out_dir = str(tmp_path / "out")
    cmd = torchrun_cmd(free_port_pair(), tp * pp, llama_gqa, "-tp", str(tp), "-pp", str(pp), *FLAGS,
                       "--out-dir", out_dir, *PROMPTS)
    code, log = run_group(cmd, child_env())
    assert code == 0, log[-4000:]
    check_ranks(out_dir, tp * pp, reference, log)


@pytest.mark.timeout(300)
def test_mpirun_tp2(llama_gqa, reference, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed (Debian: apt-get install openmpi-bin; `make` does it)")
    out_dir = str(tmp_path / "out")
    # No MASTER_ADDR/MASTER_PORT under mpirun: the store goes to 127.0.0.1:(SHARDSERVE_PORT + 1).
    env = child_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    SHARDSERVE_PORT=str(free_port_pair()))
    cmd = [mpirun, "-np", "2", "--allow-run-as-root", "--oversubscribe", sys.executable, EXAMPLE,
           "--model", llama_gqa, "-tp", "2", *FLAGS, "--out-dir", out_dir, *PROMPTS]
    code, log = run_group(cmd, env)
    assert code == 0, log[-4000:]
    check_ranks(out_dir, 2, reference, log)


@pytest.mark.timeout(180)
def test_bad_layout_every_rank_fails(llama_gqa):
    """World 2 but tp=4: each rank (launched by hand, as a launcher would) exits non-zero naming both sizes."""
    port = free_port_pair()
    procs = []
    try:
        for rank in range(2):
            env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, EXAMPLE, "--model", llama_gqa, "-tp", "4", *FLAGS],
                                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode != 0, f"rank {rank} succeeded\n{out}"
            assert "ValueError" in out and "world_size=2" in out and "tensor_parallel_size" in out, out[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)


def test_no_launcher_variables(llama_gqa, monkeypatch):
    from shardserve.distributed import env
    for name in env.ENV_VARS:
        if name in LAUNCHER_VARS or name.startswith(("OMPI_", "PMI_")):
            monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        LLM(llama_gqa, max_model_len=MAX_MODEL_LEN, kv_cache_memory=KV_BYTES,
            distributed_executor_backend="external_launcher")
