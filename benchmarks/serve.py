"""Serving benchmark: a load generator against the OpenAI-compatible server (like vLLM's benchmark_serving).

Starts `shardserve serve` itself (or targets --url), sends streaming completions at a fixed concurrency or
request rate, and prints throughput, time-to-first-token and inter-token latency p50/p99. With --sweep it
repeats for several concurrencies and --plot draws throughput and latency against concurrency. With
--compare-offline it also runs the offline engine on the same workload, in the same invocation.
    python benchmarks/serve.py --concurrency 16 --num-requests 64 --compare-offline
    python benchmarks/serve.py --sweep 1,4,16,64 --plot serve.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "server"))


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(client, url: str, prompt: list[int], out_len: int, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - start if stamps else float("nan"), "itl": itl, "tokens": tokens,
            "latency": time.perf_counter() - start}


async def run_load(url: str, prompts, out_len: int, concurrency: int, rate: float | None, model: str) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def guarded(p, delay):
            await asyncio.sleep(delay)
            async with sem:
                return await one_request(client, url, p, out_len, model)

        delays, t = [], 0.0
        rng = random.Random(0)
        for _ in prompts:
            delays.append(t)
            if rate:
                t += rng.expovariate(rate)
        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(guarded(p, d) for p, d in zip(prompts, delays)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"concurrency": concurrency, "requests": len(results), "elapsed": elapsed, "tok_s": tokens / elapsed,
            "req_s": len(results) / elapsed, "client_cpu_s": cpu, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99)}


def offline_tok_s(model: str, prompts, out_len: int, args: argparse.Namespace, concurrency: int) -> float:
    """The offline engine on the same requests, at most `concurrency` of them running at once."""
    from shardserve import LLM, SamplingParams

    with LLM(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, max_model_len=args.max_model_len,
             max_num_seqs=concurrency) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(max_tokens=2), use_tqdm=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(conc, [r["tok_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="throughput")
    for key, label in (("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"), ("itl_p50", "ITL p50"), ("itl_p99", "ITL p99")):
        b.plot(conc, [r[key] * 1e3 for r in rows], "o-", label=label)
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--model", default=None)
    ap.add_argument("-tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    ap.add_argument("-pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=None, help="requests/s (Poisson); default: all at once")
    ap.add_argument("--sweep", default=None, help="comma-separated concurrencies, e.g. 1,4,16,64")
    ap.add_argument("--plot", default=None, help="PNG path for the sweep's picture")
    ap.add_argument("--compare-offline", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ns = ap.parse_args(argv)

    from shardserve.model.checkpoint import default_model_path, read_model_spec
    from shardserve.model.tokenizer import load_tokenizer
    from throughput import make_prompts

    model = ns.model or default_model_path()
    prompts = make_prompts(load_tokenizer(read_model_spec(model)), ns.num_requests, ns.prompt_len)
    server = None
    url = ns.url
    if url is None:
        from server_proc import ServerProcess

        server = ServerProcess(model, "-tp", str(ns.tp), "-pp", str(ns.pp), "--max-num-seqs", str(ns.max_num_seqs),
                               "--kv-cache-memory", str(1 << 30), "--max-model-len", str(ns.max_model_len))
        url = server.url
    rows = []
    try:
        asyncio.run(run_load(url, prompts[:2], 4, 2, None, "tiny"))             # warm-up
        for c in [int(x) for x in ns.sweep.split(",")] if ns.sweep else [ns.concurrency]:
            rows.append(asyncio.run(run_load(url, prompts, ns.output_len, c, ns.request_rate, "tiny")))
            r = rows[-1]
            print(f"concurrency {c}: {r['tok_s']:.1f} output tok/s, {r['req_s']:.2f} req/s, TTFT p50 "
                  f"{r['ttft_p50'] * 1e3:.0f} ms p99 {r['ttft_p99'] * 1e3:.0f} ms, ITL p50 {r['itl_p50'] * 1e3:.1f} ms "
                  f"p99 {r['itl_p99'] * 1e3:.1f} ms; the load generator used {r['client_cpu_s']:.2f} s of CPU "
                  f"({r['client_cpu_s'] / r['elapsed']:.1%} of one core)", flush=True)
    finally:
        if server is not None:
            server.terminate()
    print("\n| concurrency | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50'] * 1e3:.0f} | "
              f"{r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.1f} |")
    if ns.plot and rows:
        plot(rows, ns.plot)
        print(f"plot written to {ns.plot}")
    if ns.compare_offline:
        off = offline_tok_s(model, prompts, ns.output_len, ns, rows[-1]["concurrency"])
        print(f"\noffline engine, same workload: {off:.1f} output tok/s; server at concurrency {rows[-1]['concurrency']}: "
              f"{rows[-1]['tok_s']:.1f} ({rows[-1]['tok_s'] / off:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
