"""llama.cpp as the peer: run the binaries of benchmarks/build_llama_cpp.sh and parse their output into numbers."""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

VERSION = "0.3.36"                     # llama-cpp-python sdist pinned in build_llama_cpp.sh
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "shardserve", "llama.cpp")


def bin_dir() -> str:
    """Directory of the built llama.cpp tools: $LLAMA_CPP_BIN, else $LLAMA_CPP_DIR/build-<version>/bin."""
    if os.environ.get("LLAMA_CPP_BIN"):
        return os.environ["LLAMA_CPP_BIN"]
    return os.path.join(os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR), f"build-{VERSION}", "bin")


def binary(name: str) -> str:
    path = os.path.join(bin_dir(), name)
    if not os.access(path, os.X_OK):
        found = shutil.which(name)
        if found:
            return found
        raise FileNotFoundError(f"{path} not found: run benchmarks/build_llama_cpp.sh first")
    return path


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a tool; the result also carries wall_s and cpu_s (its user + system CPU time), cpu_s / wall_s being
    about the thread count when the run had the cores to itself, less when something else ran too."""
    cpu, wall = _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    proc.wall_s, proc.cpu_s = time.perf_counter() - wall, _children_cpu_s() - cpu
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return proc


def llama_bench(gguf_path: str, threads: int = 2, n_prompt: int = 0, n_gen: int = 128, reps: int = 3,
                extra: list[str] | None = None) -> list[dict]:
    """llama-bench -o json: one dict per test (fields include avg_ts, samples_ns, n_prompt, n_gen, build_commit)."""
    args = [binary("llama-bench"), "-m", gguf_path, "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
            "-r", str(reps), "-o", "json", *(extra or [])]
    out = _run(args).stdout
    return json.loads(out[out.index("["):])


def decode_ms_per_token(gguf_path: str, threads: int = 2, n_gen: int = 128, reps: int = 3) -> float:
    """Batch-1 decode (llama-bench tg<n_gen> at depth 0): median over `reps` repetitions of ms per generated token."""
    tests = [t for t in llama_bench(gguf_path, threads, 0, n_gen, reps) if t["n_gen"] == n_gen and t["n_prompt"] == 0]
    samples = tests[0]["samples_ns"]
    return statistics.median(samples) / 1e6 / n_gen


def batched_bench(gguf_path: str, npp: int = 128, ntg: int = 128, npl: int = 64, threads: int = 2,
                  ctx: int | None = None, extra: list[str] | None = None) -> dict:
    """One llama-batched-bench run (npl sequences, separate prompts), its jsonl row as a dict."""
    ctx = ctx or npl * (npp + ntg) + 64          # rows needing more KV than -c are silently skipped by the tool
    args = [binary("llama-batched-bench"), "-m", gguf_path, "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl),
            "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "--output-format", "jsonl", *(extra or [])]
    proc = _run(args)
    rows = [json.loads(line) for line in (proc.stdout + "\n" + proc.stderr).splitlines()
            if line.startswith("{") and '"speed_tg"' in line]
    if not rows:
        raise RuntimeError(f"no result row from {' '.join(args)}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows[0]["cpu_util"] = proc.cpu_s / proc.wall_s
    return rows[0]


def batched_tokens_per_s(gguf_path: str, npp: int = 128, ntg: int = 128, npl: int = 64, threads: int = 2,
                         ctx: int | None = None) -> dict:
    """npl x (npp prompt / ntg output) through llama-batched-bench.

    output_tok_s counts as benchmarks/throughput.py does: generated tokens (npl*ntg) / total time, prompt
    processing included. S_TG (generated tokens / generation time only) and S ((prompt + generated tokens) /
    total time) are llama-batched-bench's own columns. Note the tool feeds random tokens and does not sample.
    """
    r = batched_bench(gguf_path, npp, ntg, npl, threads, ctx)
    return {"output_tok_s": npl * ntg / r["t"], "S_TG": r["speed_tg"], "S": r["speed"], "S_PP": r["speed_pp"],
            "T_PP": r["t_pp"], "T_TG": r["t_tg"], "T": r["t"], "n_kv_max": r["n_kv_max"],
            "flash_attn": r["flash_attn"], "cpu_util": r["cpu_util"]}


def perplexity(gguf_path: str, text_path: str, ctx: int = 512, threads: int = 2, extra: list[str] | None = None) -> float:
    """llama-perplexity -f text -c ctx: the final estimate (PPL over all full ctx-token chunks, second half scored)."""
    args = [binary("llama-perplexity"), "-m", gguf_path, "-f", text_path, "-c", str(ctx), "-t", str(threads),
            "-tb", str(threads), *(extra or [])]
    proc = _run(args)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    if not m:
        raise RuntimeError(f"no final estimate from {' '.join(args)}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return float(m.group(1))


def quantize(src: str, dst: str, type: str, allow_requantize: bool = True, threads: int = 2) -> str:
    """llama-quantize src -> dst as `type` (Q8_0, BF16, F32, ...); returns dst."""
    args = [binary("llama-quantize")] + (["--allow-requantize"] if allow_requantize else []) + [src, dst, type,
                                                                                               str(threads)]
    _run(args)
    return dst


def build_info() -> str:
    """Version line of the built binaries (`llama-batched-bench --version`: build number and commit)."""
    proc = subprocess.run([binary("llama-batched-bench"), "--version"], capture_output=True, text=True)
    return " ".join((proc.stdout + proc.stderr).split())[:200]


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (Linux /proc/stat): whatever else runs on the machine."""
    def sample():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(f), f[3] + f[4]                 # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_busy: float = 0.15, timeout: float = 0.0) -> float:
    """Wait (up to `timeout` s) until the machine is at most `max_busy` busy for 2 s in a row; returns the last busy."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy(2.0)
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("gguf", nargs="+", help="GGUF files to measure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="median over this many runs of each measurement")
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--npp", type=int, default=128)
    p.add_argument("--ntg", type=int, default=128)
    p.add_argument("--npl", type=int, default=64)
    p.add_argument("--text", help="text file for llama-perplexity (skipped if not given)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity context")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-batched", action="store_true")
    p.add_argument("--min-cpu-util", type=float, default=0.0, metavar="U",
                   help="batched: redo a run whose CPU time / wall time is under U (e.g. 1.8 of 2 threads: it "
                        "shared the cores), up to --max-tries runs in all; the median is over the runs kept")
    p.add_argument("--max-tries", type=int, default=6)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for the machine to be <= 15%% busy (shared machines)")
    ns = p.parse_args()

    def quiet(what: str) -> None:
        busy = wait_quiet(0.15, ns.wait_quiet)
        print(f"    [{time.strftime('%H:%M:%S')}] machine {busy:.0%} busy before {what}", flush=True)

    print(f"llama.cpp binaries: {bin_dir()}\nversion: {build_info()}", flush=True)
    rows = []
    for path in ns.gguf:
        name = os.path.basename(path)
        row = {"file": name}
        if not ns.skip_decode:
            quiet("llama-bench")
            tests = llama_bench(path, ns.threads, 0, ns.n_gen, ns.repeats)     # one process, -r repeats
            runs = [ns_ / 1e6 / ns.n_gen for ns_ in tests[0]["samples_ns"]]
            row["decode_ms"] = statistics.median(runs)
            print(f"  {name}: decode ms/token runs {[round(x, 2) for x in runs]}", flush=True)
        if not ns.skip_batched:
            runs, dropped = [], []
            for _ in range(max(ns.repeats, ns.max_tries)):
                if len(runs) == ns.repeats or len(runs) + len(dropped) == ns.max_tries:
                    break
                quiet("llama-batched-bench")
                r = batched_tokens_per_s(path, ns.npp, ns.ntg, ns.npl, ns.threads)
                print(f"    output {r['output_tok_s']:.1f} tok/s, S_TG {r['S_TG']:.1f}, S {r['S']:.1f}, "
                      f"T_PP {r['T_PP']:.1f} s, T_TG {r['T_TG']:.1f} s, cpu/wall {r['cpu_util']:.2f}", flush=True)
                (runs if r["cpu_util"] >= ns.min_cpu_util else dropped).append(r)
            if not runs:
                print(f"    no run reached cpu/wall {ns.min_cpu_util}: the median is over all of them")
                runs = dropped
            elif dropped:
                print(f"    dropped (cpu/wall < {ns.min_cpu_util}): {[round(r['output_tok_s'], 1) for r in dropped]}")
            for key in ("output_tok_s", "S_TG", "S", "cpu_util"):
                row[key] = statistics.median(r[key] for r in runs)
            row["n_runs"] = len(runs)
            row["best_tok_s"] = max(r["output_tok_s"] for r in runs + dropped)
            print(f"  {name}: batched output tok/s runs {[round(r['output_tok_s'], 1) for r in runs]}, "
                  f"S_TG {[round(r['S_TG'], 1) for r in runs]}, S {[round(r['S'], 1) for r in runs]}", flush=True)
        if ns.text:
            quiet("llama-perplexity")
            row["ppl"] = perplexity(path, ns.text, ns.ctx, ns.threads)
            print(f"  {name}: perplexity (ctx {ns.ctx}) {row['ppl']:.4f}", flush=True)
        rows.append(row)

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"\nllama.cpp, {ns.threads} threads; decode: median of {ns.repeats} llama-bench repetitions; batched: "
          f"{ns.npl} x ({ns.npp} prompt / {ns.ntg} output), median over the runs kept (runs), best of all runs")
    print(f"| file | batch-1 decode ms/token | output tok/s (gen / total time) | best output tok/s | S_TG t/s | S t/s "
          f"| cpu/wall | runs | PPL ctx {ns.ctx} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {fmt(r.get('decode_ms'), '.2f')} | {fmt(r.get('output_tok_s'), '.1f')} | "
              f"{fmt(r.get('best_tok_s'), '.1f')} | {fmt(r.get('S_TG'), '.1f')} | {fmt(r.get('S'), '.1f')} | "
              f"{fmt(r.get('cpu_util'), '.2f')} | {r.get('n_runs', '-')} | {fmt(r.get('ppl'), '.4f')} |")


if __name__ == "__main__":
    sys.exit(main())
