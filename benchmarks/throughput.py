"""Offline throughput: shardserve layouts against HF transformers generate on the same prompts, one run.

Workload (issue 2): 64 requests, ~128-token prompts, 128 output tokens (ignore_eos), SmolLM2 float32, greedy
(or sampled: --temperature T --top-p P, on both sides).
Prints output tokens/s per side and the ratio; batch-1 decode ms/token against HF and the memory-bandwidth
floor (weight bytes / measured read bandwidth). Usage:
    python benchmarks/throughput.py [--layouts 1x1,2x1,1x2:17/13] [--num-requests 64] [--skip-hf] [--hf-batches 1,16,64]
                                    [--temperature 0.8 --top-p 0.95]
A layout TPxPP may carry its own PP layer partition after a colon (`1x2:17/13`): SHARDSERVE_PP_LAYER_PARTITION
is set for that layout's engine only (its spawned workers inherit it) and the weight bytes per rank are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shardserve import LLM, SamplingParams  # noqa: E402
from shardserve.model.checkpoint import default_model_path, read_model_spec  # noqa: E402
from shardserve.model.tokenizer import load_tokenizer  # noqa: E402

TEXT = ("The history of computing is a story of abstraction layered upon abstraction. Early machines were "
        "programmed by rewiring panels, then by punched cards, then by assembly language, and eventually by "
        "high level languages that let people describe what they wanted rather than how the hardware should do "
        "it. Each step traded a little efficiency for a great deal of expressiveness, and each step widened the "
        "circle of people who could build software. Networks connected the machines, and the web connected the "
        "people, and soon the largest programs ran not on one computer but on thousands at once. ")


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens: windows at different offsets of a long text."""
    ids = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    return [ids[i * 7: i * 7 + length] for i in range(n)]


def read_bandwidth_gbs() -> float:
    x = torch.ones(64 * 1024 * 1024)                    # 256 MiB
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), children excluded."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_layout(layout: str) -> tuple[int, int, str | None]:
    """"1x2" -> (1, 2, None); "1x2:17/13" -> (1, 2, "17,13") (the SHARDSERVE_PP_LAYER_PARTITION value)."""
    sizes, _, partition = layout.lower().partition(":")
    tp, pp = (int(x) for x in sizes.split("x"))
    return tp, pp, partition.replace("/", ",") or None


def bench_shardserve(model: str, tp: int, pp: int, prompts, out_len: int, partition: str | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, dtype: str = "float32") -> dict:
    key, previous = "SHARDSERVE_PP_LAYER_PARTITION", os.environ.get("SHARDSERVE_PP_LAYER_PARTITION")
    if partition:
        os.environ[key] = partition            # read by the driver (config check) and the workers spawned here
    try:
        llm = LLM(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=dtype, seed=0,
                  max_model_len=1024, max_num_seqs=len(prompts))
    finally:
        if partition and previous is None:
            del os.environ[key]
        elif partition:
            os.environ[key] = previous
    try:
        weights = [r["weight_bytes"] for r in llm.engine.executor.collective_rpc("memory_stats")]
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=0, max_tokens=out_len, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm
        # CPU busy share of the driver and of each worker process (rank order) during the timed run; a worker
        # waiting for its next batch blocks (semaphore / socket), so 1 - busy is roughly its idle share.
        pids = [os.getpid()] + [p.pid for p in getattr(llm.engine.executor, "procs", []) if getattr(p, "pid", None)]
        cpu = [cpu_seconds(pid) for pid in pids]
        t, steps = time.perf_counter(), llm.engine.num_steps
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed, steps = time.perf_counter() - t, llm.engine.num_steps - steps
        busy = [(cpu_seconds(pid) - c) / elapsed for pid, c in zip(pids, cpu)]
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        one = [{"prompt_token_ids": prompts[0]}]
        t = time.perf_counter()
        llm.generate(one, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate(one, SamplingParams(temperature=0.0, max_tokens=65, ignore_eos=True), use_tqdm=False)
        decode_ms = (time.perf_counter() - t - t_first) / 64 * 1e3
        stats = llm.engine.stats()
    finally:
        llm.shutdown()
    return {"tok_s": n / elapsed, "elapsed": elapsed, "decode_ms": decode_ms, "tokens": n, "stats": stats,
            "weights": weights, "steps": steps, "busy": busy}


def bench_hf(gguf_path: str, prompts, out_len: int, batches: list[int], batch1_requests: int,
             temperature: float = 0.0, top_p: float = 1.0) -> dict:
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count())
    results = {}
    with torch.inference_mode():
        for bs in batches:
            todo = prompts[:batch1_requests] if bs == 1 else prompts
            t, n = time.perf_counter(), 0
            for i in range(0, len(todo), bs):
                batch = torch.tensor(todo[i:i + bs])          # equal lengths: no padding needed
                sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature \
                    else dict(do_sample=False)
                out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=out_len,
                                     min_new_tokens=out_len, pad_token_id=0, **sampling)
                n += (out.shape[1] - batch.shape[1]) * out.shape[0]
            results[bs] = n / (time.perf_counter() - t)
        ids = torch.tensor([prompts[0]])
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=65, min_new_tokens=65, do_sample=False, pad_token_id=0)
        decode_ms = (time.perf_counter() - t - t_first) / 64 * 1e3
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"tok_s_by_batch": results, "decode_ms": decode_ms, "weight_bytes": weight_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts, e.g. 1x1,2x1,1x2,2x2")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-batches", default="1,16,64")
    ap.add_argument("--hf-batch1-requests", type=int, default=4, help="batch 1 runs on this many requests")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the issue's workload); > 0 samples")
    ap.add_argument("--top-p", type=float, default=1.0)
    ns = ap.parse_args(argv)
    model = ns.model or default_model_path()
    tokenizer = load_tokenizer(read_model_spec(model))
    prompts = make_prompts(tokenizer, ns.num_requests, ns.prompt_len)
    decoding = f"temperature {ns.temperature}, top_p {ns.top_p}" if ns.temperature else "greedy"
    print(f"workload: {ns.num_requests} requests x {ns.prompt_len} prompt tokens -> {ns.output_len} output tokens, "
          f"{decoding}; "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    rows = []
    for layout in ns.layouts.split(","):
        tp, pp, partition = parse_layout(layout)
        r = bench_shardserve(model, tp, pp, prompts, ns.output_len, partition, ns.temperature, ns.top_p)
        name = f"shardserve tp={tp} pp={pp}" + (f" layers {partition.replace(',', '/')}" if partition else "")
        rows.append((name, r["tok_s"], r["decode_ms"]))
        print(f"  {name}: {r['tok_s']:.1f} tok/s ({r['tokens']} tokens in {r['elapsed']:.1f} s), "
              f"batch-1 decode {r['decode_ms']:.1f} ms/token, {r['steps']} batches, "
              f"max batches in flight {r['stats']['max_in_flight_seen']}, "
              f"weight MB per rank {[round(w / 1e6) for w in r['weights']]}, CPU busy (cores) driver "
              f"{r['busy'][0]:.2f}" + (f", ranks {[round(b, 2) for b in r['busy'][1:]]}" if r['busy'][1:] else ""),
              flush=True)
    hf = None
    if not ns.skip_hf and model.endswith(".gguf"):
        hf = bench_hf(model, prompts, ns.output_len, [int(b) for b in ns.hf_batches.split(",")],
                      ns.hf_batch1_requests, ns.temperature, ns.top_p)
        for bs, v in hf["tok_s_by_batch"].items():
            print(f"  HF transformers batch {bs}: {v:.1f} tok/s", flush=True)
        best_bs = max(hf["tok_s_by_batch"], key=hf["tok_s_by_batch"].get)
        rows.append((f"HF transformers (best: batch {best_bs})", hf["tok_s_by_batch"][best_bs], hf["decode_ms"]))
    bw = read_bandwidth_gbs()
    print("\n| engine | output tok/s | vs first layout | vs HF | batch-1 decode ms/token |")
    print("|---|---:|---:|---:|---:|")
    base = rows[-1][1] if hf else None
    for name, tok_s, ms in rows:
        ratio = f"{tok_s / base:.2f}x" if base else "-"
        print(f"| {name} | {tok_s:.1f} | {tok_s / rows[0][1]:.2f}x | {ratio} | {ms:.1f} |")
    if hf:
        floor = hf["weight_bytes"] / (bw * 1e9) * 1e3
        print(f"\nmemory-bandwidth floor: {hf['weight_bytes'] / 1e6:.0f} MB of weights / {bw:.1f} GB/s read = "
              f"{floor:.1f} ms/token; shardserve tp=1 at {rows[0][2] / floor:.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
