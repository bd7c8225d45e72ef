"""Start-up time of LLM(): import, spec, tokenizer, spawn, weights, KV cache, first token, per layout, one run.

Each start-up runs in a fresh Python process (nothing imported or cached in memory beforehand); a first discarded
start-up per layout builds the C kernels and warms the page cache, so the timed ones see what a second `python
script.py` sees. The phases come from one real LLM() call, timed at the engine's own seams (create_config, the
tokenizer, the executor's constructor and its start-up RPCs); `ready` is the wall time from launching the process
to LLM() returning, imports included; the driver's peak RSS is read after the first token. Medians over --runs.
`--compare DIR` also times the shardserve source tree in DIR (e.g. `git worktree add DIR <older commit>`),
alternating start-ups with this tree's so both see the same machine. Usage:
    python benchmarks/startup.py [--layouts 1x1,2x2] [--runs 3] [--model PATH] [--compare DIR]
"""
from __future__ import annotations

import time

_T_LAUNCHED = time.time()            # before any import: the child's clock starts with the script

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PHASES = ("import", "spec", "tokenizer", "spawn", "weights", "kv_cache", "other", "ready", "first_token")
# where each phase is measured: (function being timed) -> phase
_RPC_PHASE = {"init_device": "spawn", "load_model": "weights", "num_available_blocks": "kv_cache",
              "init_cache": "kv_cache"}


def child(tp: int, pp: int, model: str | None, launched: float, root: str) -> dict:
    """One start-up in this (fresh) process, shardserve imported from `root`; phase seconds as a dict."""
    sys.path.insert(0, root)                     # spawned workers inherit sys.path, so they import the same tree
    import torch  # noqa: F401  the floor: every rank imports it
    from shardserve import SamplingParams
    from shardserve.engine import engine_args, llm_engine
    from shardserve.entrypoints.llm import LLM
    t_imported = time.time()
    phases = {p: 0.0 for p in PHASES}

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            t = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[phase if isinstance(phase, str) else phase(*args)] += time.time() - t
        return wrapper

    engine_args.EngineArgs.create_config = timed(engine_args.EngineArgs.create_config, "spec")
    llm_engine.load_tokenizer = timed(llm_engine.load_tokenizer, "tokenizer")
    make_executor = llm_engine.create_executor

    def create_executor(config):
        t = time.time()
        executor = make_executor(config)             # spawns the workers (mp) or builds the one in-process
        phases["spawn"] += time.time() - t
        executor.collective_rpc = timed(executor.collective_rpc, lambda method, *a: _RPC_PHASE.get(method, "other"))
        return executor

    llm_engine.create_executor = create_executor
    t = time.time()
    llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=512, max_num_seqs=8)
    t_ready = time.time()
    phases["import"] = t_imported - launched
    phases["ready"] = t_ready - launched
    phases["other"] = (t_ready - t) - sum(phases[p] for p in ("spec", "tokenizer", "spawn", "weights", "kv_cache"))
    t = time.time()
    llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    phases["first_token"] = time.time() - t
    import resource
    phases["driver_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # peak, KiB -> MiB
    llm.shutdown()
    return phases


def run_once(tp: int, pp: int, model: str | None, root: str = ROOT) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{tp}x{pp}", "--root", root]
    cmd += ["--model", model] if model else []
    launched = time.time()
    out = subprocess.run(cmd + ["--launched", repr(launched)], capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"start-up {tp}x{pp} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layouts", default="1x1,2x2", help="TPxPP layouts, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="timed start-ups per layout (after one discarded)")
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--compare", default=None, help="another shardserve source tree to time alternately")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child:
        tp, pp = (int(x) for x in ns.child.split("x"))
        print(json.dumps(child(tp, pp, ns.model, ns.launched or _T_LAUNCHED, ns.root)), flush=True)
        return 0
    trees = {"this tree": ROOT} if ns.compare is None else {ns.compare: os.path.abspath(ns.compare), "this tree": ROOT}
    print(f"{os.cpu_count()} cores; seconds, median of {ns.runs} fresh processes per layout (one discarded first)")
    print("| layout | " + ("tree | " if ns.compare else "") + " | ".join(PHASES) + " | driver peak RSS MB |")
    print("|---|" + ("---|" if ns.compare else "") + "---:|" * (len(PHASES) + 1))
    for layout in ns.layouts.split(","):
        tp, pp = (int(x) for x in layout.lower().split("x"))
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for root in trees.values():
            run_once(tp, pp, ns.model, root)                         # builds kernels, warms the page cache
        for _ in range(ns.runs):
            for name, root in trees.items():                         # alternate: both trees see the same machine
                runs[name].append(run_once(tp, pp, ns.model, root))
        for name in trees:
            med = {p: statistics.median(r[p] for r in runs[name]) for p in PHASES}
            tree = f"{name} | " if ns.compare else ""
            rss = statistics.median(r.get("driver_rss_mb", 0.0) for r in runs[name])
            print(f"| tp={tp} pp={pp} | {tree}" + " | ".join(f"{med[p]:.2f}" for p in PHASES) + f" | {rss:.0f} |",
                  flush=True)
            spread = ", ".join(f"{r['ready']:.2f}" for r in runs[name])
            print(f"  {name}: ready per run {spread}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
