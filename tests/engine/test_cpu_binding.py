"""CPU ranks of one node are pinned to disjoint cores when they fit, left to the OS otherwise or when asked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shardserve import LLM, SamplingParams
from shardserve.distributed import env
from shardserve.worker.cpu_binding import cores_for_rank

ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning two ranks apart needs two allowed cores")


@pytest.mark.parametrize("allowed,rank,ranks,threads,expected", [
    ([0, 1], 0, 2, 1, [0]),
    ([0, 1], 1, 2, 1, [1]),
    ([4, 5, 6, 7, 8, 9], 1, 2, 3, [7, 8, 9]),        # taken from the allowed set, in order
    ([0, 1, 2, 3], 1, 2, 1, [1]),                     # fewer threads than cores: the first ones
    ([0, 1], 0, 1, 2, None),                          # a single rank keeps the whole process's set
    ([0, 1], 0, 4, 1, None),                          # 4 ranks on 2 cores: the OS shares them out
    ([0, 1, 2, 3], 0, 2, 3, None),
])
def test_cores_for_rank(allowed, rank, ranks, threads, expected):
    assert cores_for_rank(allowed, rank, ranks, threads) == expected


PROBE = "import os; from shardserve.worker.cpu_binding import bind_rank; print(bind_rank(1, 2, 1), sorted(os.sched_getaffinity(0)))"


@needs_two_cores
@pytest.mark.parametrize("setting", [None, "auto", "off"])
def test_bind_rank_pins_this_process(setting):
    environ = {k: v for k, v in os.environ.items() if k != "SHARDSERVE_CPU_BIND"}
    if setting:
        environ["SHARDSERVE_CPU_BIND"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split(" ", 1)
    if setting == "off":
        assert out == ["None", f"{ALLOWED}\n"]
    else:
        assert out == [f"[{ALLOWED[1]}]", f"[{ALLOWED[1]}]\n"]


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_CPU_BIND", "numa")
    with pytest.raises(ValueError, match="SHARDSERVE_CPU_BIND='numa': expected 'auto' or 'off'"):
        env.cpu_bind()


@needs_two_cores
@pytest.mark.timeout(300)
def test_tp2_workers_sit_on_their_own_cores(llama_gqa, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_NUM_THREADS", "1")
    with LLM(llama_gqa, tensor_parallel_size=2, max_model_len=128, kv_cache_memory=16 << 20) as llm:
        pids = [p.pid for p in llm.engine.executor.procs]
        cores = [sorted(os.sched_getaffinity(pid)) for pid in pids]
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    assert cores == [[ALLOWED[0]], [ALLOWED[1]]]
    assert sorted(os.sched_getaffinity(0)) == ALLOWED                       # the caller's process is left alone
