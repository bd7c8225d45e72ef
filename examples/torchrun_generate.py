"""SPMD greedy generation: run under torchrun or mpirun; every rank builds the same LLM and prints the same outputs.

    torchrun --nproc-per-node 2 examples/torchrun_generate.py -tp 2 "The capital of France is"
    mpirun -np 2 python examples/torchrun_generate.py -tp 2 "The capital of France is"
"""
from __future__ import annotations

import argparse
import json
import os

from shardserve import LLM, SamplingParams
from shardserve.distributed import env

DEFAULT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompts", nargs="*", default=DEFAULT_PROMPTS, metavar="PROMPT")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes per rank")
    p.add_argument("--logprobs", type=int, default=None, help="also report the top-K token ids per position")
    p.add_argument("--seed", type=int, default=0, help="engine seed: must be the same on every rank")
    p.add_argument("--out-dir", default=None, help="also write the records to OUT_DIR/rank{R}.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = (env.launcher_rank() or (0, 1, 0))[0]
    llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size, distributed_executor_backend="external_launcher",
              max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory, seed=args.seed)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.logprobs)
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    records = []
    for out in outputs:
        completion = out.outputs[0]
        record = {"rank": rank, "prompt": out.prompt, "token_ids": list(completion.token_ids),
                  "text": completion.text}
        if completion.logprobs is not None:
            record["top_token_ids"] = [sorted(entry) for entry in completion.logprobs]
        records.append(record)
        print(json.dumps(record), flush=True)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    main()
