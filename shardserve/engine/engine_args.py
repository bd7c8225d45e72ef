"""EngineArgs: the user-facing knobs (LLM kwargs and CLI flags, vLLM's names) -> a validated EngineConfig."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from shardserve.config import QUANTIZATIONS, CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, resolve_dtype
from shardserve.model.checkpoint import default_model_path, read_model_spec
from shardserve.model.layers.formats import check_format


@dataclass
class EngineArgs:
    model: str | None = None                 # HF folder or .gguf; None = the embedded SmolLM2
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    device: str = "auto"                     # "auto" | "cpu" | "cuda"
    dtype: str = "auto"
    quantization: str | None = None          # "int8": weight-only int8 with per-channel scales, made at load
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    threads_per_rank: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29501
    distributed_timeout_seconds: float = 300.0

    def create_config(self) -> EngineConfig:
        path = self.model or default_model_path()
        spec = read_model_spec(path)
        if spec.format == "gguf":                    # refuse a tensor type with no kernel before any rank starts
            for tensor in spec.extra["gguf_tensors"]:     # the table the spec already parsed
                check_format(tensor.type_name, tensor.name)
        device = self.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                  self.distributed_executor_backend, device, self.threads_per_rank, self.nnodes,
                                  self.node_rank, self.master_addr, self.master_port,
                                  self.distributed_timeout_seconds)
        max_len = self.max_model_len or spec.max_position_embeddings
        if spec.sliding_window is not None and self.max_model_len is None:
            max_len = min(max_len, spec.sliding_window)
        if spec.sliding_window is not None and max_len > spec.sliding_window:
            raise ValueError(f"max_model_len ({max_len}) exceeds the model's sliding_window ({spec.sliding_window}), "
                             "which shardserve does not implement; lower max_model_len")
        model = ModelConfig(spec, resolve_dtype(self.dtype, spec, device), max_len, self.seed, self.quantization)
        cache = CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                            enable_prefix_caching=self.enable_prefix_caching)
        batched = self.max_num_batched_tokens or max(2048, self.max_num_seqs)
        scheduler = SchedulerConfig(self.max_num_seqs, batched, max_len)
        return EngineConfig(model, parallel, cache, scheduler)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--model", default=None, help="HF checkpoint folder or .gguf file (default: SmolLM2)")
        parser.add_argument("--tokenizer", default=None)
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
        parser.add_argument("--distributed-executor-backend", default=None,
                            choices=["uni", "mp", "ray", "external_launcher"])
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        parser.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATIONS),
                            help="weight-only int8 with per-channel scales, made at load from a float checkpoint")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=64)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None)
        parser.add_argument("--block-size", type=int, default=16)
        parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV-cache bytes per rank")
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
        parser.add_argument("--threads-per-rank", type=int, default=None)
        nodes = parser.add_argument_group("multi-node without Ray (node 0 runs the engine, others --headless)")
        nodes.add_argument("--nnodes", type=int, default=1, help="number of nodes; ranks are split evenly")
        nodes.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 = the engine's node")
        nodes.add_argument("--master-addr", default=None, help="node 0's address, reachable from every node")
        nodes.add_argument("--master-port", type=int, default=29501,
                           help="node 0's control port (authenticated with SHARDSERVE_SECRET)")
        nodes.add_argument("--distributed-timeout-seconds", type=float, default=300.0,
                           help="how long start-up waits for nodes and ranks to join")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
