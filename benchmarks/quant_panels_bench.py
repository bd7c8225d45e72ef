"""quant_panels (k-major panels) vs quant_linear (GGUF rows) vs the float32 panel GEMM, weights cold.

usage: .venv/bin/python benchmarks/quant_panels_bench.py [--threads 2] [--rounds 9] [--formats Q4_1,Q8_0,Q4_0]
"""
from __future__ import annotations

import argparse

import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from quant_gemm import interleaved_medians
from shardserve.kernels.cpu import native, native_linear, quant_linear, quant_panels

SHAPES = [(576, 3072), (1536, 576)]
COLD_BYTES = 160 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--formats", default="Q4_1,Q8_0,Q4_0")
    args = ap.parse_args()
    assert native.available()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    calls = {}
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.05
        xs = {m: torch.randn(m, k, generator=gen) for m in (1, 64)}
        f32 = native_linear.pack(w)
        cps = [f32.clone() for _ in range(max(2, COLD_BYTES // (n * k * 4)))]
        for m in (1, 64):
            st = [0]
            def c(cps=cps, x=xs[m], st=st, n=n):
                st[0] = (st[0] + 1) % len(cps)
                native_linear.linear(x, cps[st[0]], None, n)
            calls[("f32", k, n, m)] = c
        for fmt in args.formats.split(","):
            rows = torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType[fmt]))
            pk = quant_panels.repack(rows, fmt, k)
            nc = max(2, COLD_BYTES // rows.numel())
            rcps = [rows.clone() for _ in range(nc)]
            pcps = [pk.clone() for _ in range(nc)]
            for m in (1, 64):
                st1, st2 = [0], [0]
                def r(cps=rcps, x=xs[m], st=st1, fmt=fmt, k=k):
                    st[0] = (st[0] + 1) % len(cps)
                    quant_linear.linear(x, cps[st[0]], fmt, k)
                def p(cps=pcps, x=xs[m], st=st2, fmt=fmt, k=k, n=n):
                    st[0] = (st[0] + 1) % len(cps)
                    quant_panels.linear(x, cps[st[0]], fmt, n, k)
                calls[(fmt + ":rows", k, n, m)] = r
                calls[(fmt + ":panels", k, n, m)] = p
    med = interleaved_medians(calls, args.rounds, 1e8, 5)
    print(f"threads={args.threads} rounds={args.rounds} (medians, us; weights cold, {COLD_BYTES >> 20} MiB cycled)")
    print(f"{'K':>5} {'N':>5} {'fmt':>5} | {'M=1 f32':>8} {'rows':>8} {'panels':>8} {'rows/pan':>8} | "
          f"{'M=64 f32':>8} {'rows':>8} {'panels':>8} {'pan/f32':>8} {'rows/f32':>8}")
    for k, n in SHAPES:
        for fmt in args.formats.split(","):
            a = [med[(x, k, n, 1)] * 1e6 for x in ("f32", fmt + ":rows", fmt + ":panels")]
            b = [med[(x, k, n, 64)] * 1e6 for x in ("f32", fmt + ":rows", fmt + ":panels")]
            print(f"{k:>5} {n:>5} {fmt:>5} | {a[0]:>8.1f} {a[1]:>8.1f} {a[2]:>8.1f} {a[1] / a[2]:>7.2f}x | "
                  f"{b[0]:>8.1f} {b[1]:>8.1f} {b[2]:>8.1f} {b[2] / b[0]:>7.2f}x {b[1] / b[0]:>7.2f}x")


if __name__ == "__main__":
    main()
