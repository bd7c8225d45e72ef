"""Per-rank memory: weight bytes and peak RSS of every worker after loading, for several TP x PP layouts.

Each layout runs with the mp executor (one process per rank, tp=1 included) so every rank's peak RSS
(VmHWM) is its own. For a GGUF file it also prints the bound weights must stay under: 1.1 x the file's tensor
bytes / tp plus the replicated norms. Usage:
python benchmarks/memory.py [--layouts 1x1,2x1,1x2,2x2] [--model PATH] [--dtype D] [--quantization int8]
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
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ns = ap.parse_args(argv)
    file_bytes, norm_bytes = gguf_bytes(ns.model)
    print("| layout | rank | weights MB | bound MB (1.1 x file / tp + norms) | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for layout in ns.layouts.split(","):
        tp, pp = (int(x) for x in layout.split("x"))
        with LLM(ns.model, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp",
                 max_model_len=512, kv_cache_memory=64 << 20, dtype=ns.dtype, quantization=ns.quantization) as llm:
            stats = llm.engine.executor.collective_rpc("memory_stats")
        bound = f"{(1.1 * file_bytes / tp + norm_bytes) / 1e6:.1f}" if file_bytes else "-"
        for s in stats:
            print(f"| tp={tp} pp={pp} | {s['rank']} | {s['weight_bytes'] / 1e6:.1f} | {bound} | "
                  f"{s['peak_rss_bytes'] / 1e6:.0f} |", flush=True)
    return 0


def gguf_bytes(model: str | None) -> tuple[int, int]:
    """(all tensor bytes, 1-D tensor bytes: the norms every TP rank holds whole) of a GGUF file; (0, 0) otherwise."""
    import gguf
    from shardserve.model.checkpoint import default_model_path
    path = model or default_model_path()
    if not path.endswith(".gguf"):
        return 0, 0
    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_bytes) for t in tensors if len(t.shape) == 1)


if __name__ == "__main__":
    sys.exit(main())
