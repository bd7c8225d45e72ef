"""Quantized linear kernels (quant_linear.c, float32 activations) vs the float32 panel GEMM, weights cold.

usage: .venv/bin/python benchmarks/quant_gemm.py [--threads 2] [--rounds 7] [--formats Q8_0,Q4_0,...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from shardserve.kernels.cpu import native, native_linear, quant_linear  # noqa: E402

SHAPES = [(576, 3072), (1536, 576), (576, 576)]          # (K, N): gate_up, down, q/o projections
HEAD = (576, 49152)                                     # the LM head, Q8_0 only
COLD_BYTES = 192 << 20                                  # cycle over copies totalling this (> L3)


def _weights(fmt: str, k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(n, k, generator=gen) * 0.05
    if fmt == "I8":
        return quant_linear.quantize_int8(w)
    if fmt in ("Q4_K", "Q5_K", "Q6_K"):
        import kquants
        return torch.from_numpy(kquants.quantize_k(w.numpy(), fmt)), None
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    return torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType[fmt])), None


def _case(fmt: str, k: int, n: int, m: int, gen: torch.Generator):
    """(call, weight bytes per call): call() runs one product on the next cold copy of the weights."""
    if fmt == "f32":
        one = native_linear.pack(torch.randn(n, k, generator=gen))
        nbytes = n * k * 4
        copies = [one.clone() for _ in range(max(2, COLD_BYTES // nbytes))]
        x = torch.randn(m, k, generator=gen)
        state = [0]

        def call():
            state[0] = (state[0] + 1) % len(copies)
            native_linear.linear(x, copies[state[0]], None, n)
        return call, nbytes
    w, scales = _weights(fmt, k, n, gen)
    nbytes = w.numel() + (0 if scales is None else scales.numel() * 4)
    copies = [w.clone() for _ in range(max(2, COLD_BYTES // nbytes))]
    x = torch.randn(m, k, generator=gen)
    state = [0]

    def call():
        state[0] = (state[0] + 1) % len(copies)
        quant_linear.linear(x, copies[state[0]], fmt, k, scales=scales)
    return call, nbytes


def interleaved_medians(calls: dict[tuple, object], rounds: int, budget: float, min_reps: int) -> dict[tuple, float]:
    """Seconds per call, the median over `rounds` rounds that each time every case once (interleaved, so drift in
    the machine's speed hits all cases alike). A case (fmt, K, N, M) repeats about budget / (K N max(M, 8)) times."""
    times: dict[tuple, list[float]] = {cfg: [] for cfg in calls}
    for _ in range(rounds):
        for cfg, call in calls.items():
            reps = max(min_reps, int(budget // (cfg[1] * cfg[2] * max(cfg[3], 8))))
            call()
            start = time.perf_counter()
            for _ in range(reps):
                call()
            times[cfg].append((time.perf_counter() - start) / reps)
    return {cfg: statistics.median(v) for cfg, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--formats", default="f32,Q8_0,Q4_0,Q4_1,Q4_K,Q5_K,Q6_K,I8")
    args = parser.parse_args()
    assert native.available(), "the C kernels are not built (no gcc?)"
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    formats = args.formats.split(",")
    configs = [(fmt, k, n, m) for (k, n) in SHAPES for fmt in formats for m in (1, 64)
               if fmt == "f32" or k % quant_linear.FORMATS[fmt][0] == 0]      # K-quants need K % 256 == 0
    configs += [(fmt, *HEAD, m) for fmt in ("f32", "Q8_0") if fmt in formats for m in (1, 64)]
    cases = {}
    for cfg in configs:
        cases[cfg] = _case(*cfg, gen)
    med = interleaved_medians({cfg: call for cfg, (call, _) in cases.items()}, args.rounds, 2e8, 3)
    avx512 = bool(native.lib().quant_linear_avx512())
    print(f"threads={args.threads} rounds={args.rounds} avx512={avx512} (medians; weights cold: "
          f"{COLD_BYTES >> 20} MiB of copies cycled)")
    print(f"{'K':>5} {'N':>6} {'format':>6} {'MB':>7} | {'M=1 ms':>8} {'GB/s':>6} {'vs f32':>6} | "
          f"{'M=64 ms':>8} {'GB/s':>6} {'vs f32':>6}")
    for k, n in SHAPES + [HEAD]:
        for fmt in formats:
            if (fmt, k, n, 1) not in cases:
                continue
            nbytes = cases[(fmt, k, n, 1)][1]
            row = f"{k:>5} {n:>6} {fmt:>6} {nbytes / 1e6:>7.3f} |"
            for m in (1, 64):
                t = med[(fmt, k, n, m)]
                base = med.get(("f32", k, n, m), float("nan"))
                row += f" {t * 1e3:>8.4f} {nbytes / t / 1e9:>6.1f} {base / t:>5.2f}x |"
            print(row.rstrip("|"))


if __name__ == "__main__":
    main()
