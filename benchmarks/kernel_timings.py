"""CPU kernels at SmolLM2 shapes, each against the torch path it replaces, timed in one invocation.

    python benchmarks/kernel_timings.py [--rounds 8]

Rows: decode attention (batch 64, context 192, blocks of 16 shuffled over the cache as after churn) for the
tp=1 heads (9 q / 3 kv, two threads) and the tp=2 ranks' heads (6/2 and 3/1, one thread each); prefill attention
for a 2048-token step of 16 prompts (one C call vs stacked bmm per prompt); SiLU*mul; the KV-cache write; the
greedy argmax; the linears (panel GEMM with SiLU*up fused vs oneDNN's prepacked GEMM plus the SiLU*mul
kernel); the greedy LM head (bf16 screen vs float32 logits and the argmax kernel); the sampler's top-k / top-p
cuts (sampling.c vs torch). Each cell is the median over
`--rounds` interleaved rounds (kernel, then torch, then kernel ...), so drift hits both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from shardserve.model.forward_batch import SeqChunk, build_forward_batch  # noqa: E402
from shardserve.model.layers import sampler
from shardserve.kernels.cpu import fused_ops, greedy_head, native, native_linear  # noqa: E402
from shardserve.model.layers.attention import PagedAttention  # noqa: E402
from shardserve.sampling_params import SamplingParams  # noqa: E402
from shardserve.worker.malloc_tuning import keep_freed_memory  # noqa: E402

BLOCK = 16


def decode_case(heads: int, kv_heads: int, batch: int = 64, context: int = 192, layers: int = 30):
    """`layers` PagedAttention layers with random caches (cold across layers, as in a real step), one batch."""
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    blocks_each = -(-context // BLOCK)
    free = list(range(1, batch * blocks_each + 1))
    rng.shuffle(free)
    chunks = [SeqChunk([5], context - 1, free[b * blocks_each:(b + 1) * blocks_each], True) for b in range(batch)]
    fb = build_forward_batch(chunks, BLOCK, torch.device("cpu"))
    attns = []
    for _ in range(layers):
        a = PagedAttention(heads, kv_heads, 64, 0.125)
        a.k_cache = torch.randn((batch * blocks_each + 1) * BLOCK, kv_heads, 64, generator=gen)
        a.v_cache = torch.randn_like(a.k_cache)
        attns.append(a)
    q = torch.randn(batch, heads, 64, generator=gen)
    out = torch.empty_like(q)
    return lambda: [a._decode(q, fb, out) for a in attns]


def prefill_case(prompts: int = 16, n: int = 128):
    """A 2048-token prefill step as in the throughput benchmark: 16 fresh 128-token prompts, one layer."""
    gen = torch.Generator().manual_seed(1)
    a = PagedAttention(9, 3, 64, 0.125)
    per = n // BLOCK
    chunks = [SeqChunk([1] * n, 0, list(range(1 + p * per, 1 + (p + 1) * per)), True) for p in range(prompts)]
    fb = build_forward_batch(chunks, BLOCK, torch.device("cpu"))
    a.k_cache = torch.zeros((prompts * per + 1) * BLOCK, 3, 64)
    a.v_cache = torch.zeros_like(a.k_cache)
    q, k, v = (torch.randn(prompts * n, h, 64, generator=gen) for h in (9, 3, 3))
    return lambda: a(q, k, v, fb)


def linear_case(rows: int, layers: int = 30):
    """The four linears of `layers` decoder layers at SmolLM2 shapes (weights cold, as in a step): panel GEMM
    (SiLU*up fused into gate_up) against oneDNN's prepacked GEMM and the SiLU*mul kernel after it."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]          # qkv, o, gate_up, down: [N, K]
    weights = [[torch.randn(n, k, generator=gen) * 0.05 for n, k in shapes] for _ in range(layers)]
    panels = [[native_linear.pack(w[0]), native_linear.pack(w[1]), native_linear.pack_gate_up(w[2]),
               native_linear.pack(w[3])] for w in weights]
    onednn = [[torch.ops.mkldnn._reorder_linear_weight(x, None) for x in w] for w in weights]
    x576, x1536 = torch.randn(rows, 576, generator=gen), torch.randn(rows, 1536, generator=gen)

    def run():
        if os.environ.get("SHARDSERVE_CPU_KERNELS") != "torch":
            for qkv, o, gate_up, down in panels:
                native_linear.linear(x576, qkv, None, 960), native_linear.linear(x576, o, None, 576)
                native_linear.silu_linear(x576, gate_up, 1536), native_linear.linear(x1536, down, None, 576)
            return
        for qkv, o, gate_up, down in onednn:
            for x, w in ((x576, qkv), (x576, o), (x1536, down)):
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            with kernel_path("native"):
                fused_ops.silu_and_mul(torch.ops.mkldnn._linear_pointwise(x576, gate_up, None, "none", [], ""))
    return run


def silu_case(rows: int = 64):
    gate_up = torch.randn(rows, 3072)
    return lambda: fused_ops.silu_and_mul(gate_up) if native.applies(gate_up) else \
        torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]


def kv_write_case(rows: int = 64):
    qkv = torch.randn(rows, 960)
    k, v = torch.randn(rows, 3, 64), qkv[:, 768:].view(rows, 3, 64)
    slots = torch.randperm(8192)[:rows]
    caches = torch.zeros(8192, 3, 64), torch.zeros(8192, 3, 64)

    def write():
        if not fused_ops.write_kv(k, v, slots, *caches):
            caches[0].index_copy_(0, slots, k)
            caches[1].index_copy_(0, slots, v)
    return write


def argmax_case(rows: int = 64, vocab: int = 49152):
    logits = torch.randn(rows, vocab)
    return lambda: fused_ops.argmax_rows(logits) if native.applies(logits) else logits.argmax(dim=-1)


def greedy_head_case(rows: int, vocab: int = 49152, hidden: int = 576):
    """Greedy tokens of the LM head: the bf16 screen (greedy_head.c) against the float32 panel GEMM's full logits
    and the argmax kernel (what greedy batches ran before; both C kernels, so this row compares the methods)."""
    gen = torch.Generator().manual_seed(3)
    packed = native_linear.pack(torch.randn(vocab, hidden, generator=gen) * 0.05)
    screen = greedy_head.GreedyScreen(packed, vocab) if greedy_head.supported() else None
    x = torch.randn(rows, hidden, generator=gen) * 3

    def run():
        if os.environ.get("SHARDSERVE_CPU_KERNELS") != "torch" and screen is not None:
            return screen.argmax(x)
        with kernel_path("native"):
            return fused_ops.argmax_rows(native_linear.linear(x, packed, None, vocab))
    return run


def sampler_case(rows: int = 64, vocab: int = 49152):
    """A step's sampled rows (temperature 0.8, top_k 50, top_p 0.95): sampling.c's cuts vs the torch ones."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(4)) * 4
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=1)
    reqs = [sampler.SampleRequest(params, i, [1], []) for i in range(rows)]
    scratch = logits.clone()

    def run():
        scratch.copy_(logits)                          # sample() takes the logits as scratch
        return sampler.sample(scratch, reqs, ())
    return run


@contextlib.contextmanager
def kernel_path(path: str):
    """Run the block on shardserve's kernels ("native") or on the torch ops they replace ("torch": the C kernels
    off; prefill then takes its stacked batched matmuls per chunk)."""
    before = os.environ.get("SHARDSERVE_CPU_KERNELS")
    os.environ["SHARDSERVE_CPU_KERNELS"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SHARDSERVE_CPU_KERNELS")
        else:
            os.environ["SHARDSERVE_CPU_KERNELS"] = before


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    keep_freed_memory()
    if not native.available():
        sys.exit("the C kernels are not built here (no gcc, or SHARDSERVE_CPU_KERNELS=torch): nothing to compare")
    cores = os.cpu_count() or 1
    cases = [  # (what, threads, per-call unit, build, reps, per-call divisor)
        ("decode attention 9/3 heads, B=64 ctx 192", min(2, cores), "ms/layer", decode_case(9, 3), 2, 30),
        ("decode attention 6/2 heads (tp=2 rank 0)", 1, "ms/layer", decode_case(6, 2), 2, 30),
        ("decode attention 3/1 heads (tp=2 rank 1)", 1, "ms/layer", decode_case(3, 1), 2, 30),
        ("prefill attention, 16 x 128-token prompts", min(2, cores), "ms", prefill_case(), 10, 1),
        ("linears of 30 layers, 64 rows (panel GEMM vs oneDNN)", min(2, cores), "ms", linear_case(64), 3, 1),
        ("linears of 30 layers, 32 rows, one thread (a row stream)", 1, "ms", linear_case(32), 3, 1),
        ("linears of 1 layer, 2048 rows (a prefill step)", min(2, cores), "ms", linear_case(2048, 1), 3, 1),
        ("SiLU*mul [64, 3072]", min(2, cores), "us", silu_case(), 200, 1),
        ("KV write, 64 rows", min(2, cores), "us", kv_write_case(), 500, 1),
        ("greedy argmax [64, 49152]", min(2, cores), "us", argmax_case(), 50, 1),
        ("greedy LM head, 64 rows x 49152 (bf16 screen vs float32 GEMM + argmax)", min(2, cores), "ms",
         greedy_head_case(64), 5, 1),
        ("greedy LM head, 1 row x 49152 (batch-1 decode)", min(2, cores), "ms", greedy_head_case(1), 20, 1),
        ("sampler, 64 rows x 49152, T 0.8 top_k 50 top_p 0.95 (C cuts vs torch)", min(2, cores), "ms",
         sampler_case(), 5, 1),
    ]
    print(f"{cores} cores, torch {torch.__version__}, {args.rounds} interleaved rounds, medians\n")
    print("| kernel | threads | shardserve | torch path | speed-up |\n|---|---:|---:|---:|---:|")
    for what, threads, unit, fn, reps, per in cases:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"native": [], "torch": []}
        for _ in range(args.rounds):
            for path in times:
                with kernel_path(path):
                    times[path].append(timed(fn, reps) / per)
        scale = 1e3 if unit.startswith("ms") else 1e6
        ours, base = (statistics.median(times[p]) * scale for p in ("native", "torch"))
        print(f"| {what} | {threads} | {ours:.2f} {unit} | {base:.2f} {unit} | {base / ours:.2f}x |")


if __name__ == "__main__":
    main()
