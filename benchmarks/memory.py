"""Per-rank memory: weight bytes and peak RSS of every worker after loading, for several TP x PP layouts.

Each layout runs with the mp executor (one process per rank, tp=1 included) so every rank's peak RSS
(VmHWM) is its own. Usage: python benchmarks/memory.py [--layouts 1x1,2x1,1x2,2x2] [--model PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shardserve import LLM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2")
    ns = ap.parse_args(argv)
    print("| layout | rank | weights MB | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for layout in ns.layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        with LLM(ns.model, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp",
                 max_model_len=512, kv_cache_memory=64 << 20) as llm:
            stats = llm.engine.executor.collective_rpc("memory_stats")
        for s in stats:
            print(f"| tp={tp} pp={pp} | {s['rank']} | {s['weight_bytes'] / 1e6:.0f} | {s['peak_rss_bytes'] / 1e6:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
