"""Weight formats side by side: shardserve and llama.cpp on the same SmolLM2 files, one invocation, alternating.

For each format (F32, BF16, Q8_0 written by smollm2_formats.py from the shipped file, and the shipped Q4_1):
batch-1 decode ms/token, 64 x (128 prompt / 128 output) output tok/s (shardserve: benchmarks/throughput.py's
workload; llama.cpp: llama-batched-bench, total output tokens / total time incl. prompts), and resident weight MB.
Usage (after benchmarks/build_llama_cpp.sh and benchmarks/smollm2_formats.py):
    python benchmarks/formats.py [--formats F32,BF16,Q8_0,Q4_1] [--rounds 1] [--skip-llama-cpp]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import llama_cpp  # noqa: E402  (benchmarks/llama_cpp.py)
from throughput import bench_shardserve, make_prompts  # noqa: E402
from shardserve.model.checkpoint import default_model_path, read_model_spec  # noqa: E402
from shardserve.model.tokenizer import load_tokenizer  # noqa: E402

MODELS = os.path.join(os.path.expanduser("~"), ".cache", "shardserve", "models")
DTYPE = {"F32": "float32", "BF16": "bfloat16", "Q8_0": "float32", "Q4_1": "float32"}   # activations per format


def model_path(fmt: str) -> str:
    if fmt == "Q4_1":
        return default_model_path()
    path = os.path.join(MODELS, f"SmolLM2-135M-Instruct.{fmt}.gguf")
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run python benchmarks/smollm2_formats.py first")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="F32,BF16,Q8_0,Q4_1")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two engines this many times (medians)")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ns = ap.parse_args(argv)
    prompts = make_prompts(load_tokenizer(read_model_spec(default_model_path())), 64, 128)
    if not ns.skip_llama_cpp:
        print(f"llama.cpp: {llama_cpp.build_info()}", flush=True)
    table = []
    for fmt in ns.formats.split(","):
        path = model_path(fmt)
        ours, theirs = {"decode": [], "tok_s": []}, {"decode": [], "tok_s": []}
        weights = 0.0
        for _ in range(ns.rounds):
            r = bench_shardserve(path, 1, 1, prompts, 128, dtype=DTYPE[fmt])
            ours["decode"].append(r["decode_ms"])
            ours["tok_s"].append(r["tok_s"])
            weights = r["weights"][0] / 1e6
            print(f"  {fmt} shardserve: decode {r['decode_ms']:.2f} ms/token, {r['tok_s']:.1f} tok/s, "
                  f"weights {weights:.0f} MB", flush=True)
            if ns.skip_llama_cpp:
                continue
            theirs["decode"].append(llama_cpp.decode_ms_per_token(path, threads=2, n_gen=64, reps=3))
            theirs["tok_s"].append(llama_cpp.batched_tokens_per_s(path, 128, 128, 64, threads=2)["output_tok_s"])
            print(f"  {fmt} llama.cpp: decode {theirs['decode'][-1]:.2f} ms/token, {theirs['tok_s'][-1]:.1f} tok/s",
                  flush=True)
        med = {k: statistics.median(v) if v else float("nan") for k, v in ours.items()}
        ref = {k: statistics.median(v) if v else float("nan") for k, v in theirs.items()}
        table.append((fmt, med, ref, weights, os.path.getsize(path) / 1e6))
    print("\n| format | shardserve decode ms/token | llama.cpp decode ms/token | shardserve 64x(128/128) tok/s | "
          "llama.cpp tok/s | ratio | shardserve weights MB | file MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt, med, ref, weights, size in table:
        print(f"| {fmt} | {med['decode']:.2f} | {ref['decode']:.2f} | {med['tok_s']:.1f} | {ref['tok_s']:.1f} | "
              f"{med['tok_s'] / ref['tok_s']:.2f}x | {weights:.0f} | {size:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
