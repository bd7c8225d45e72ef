"""Engine configuration: one frozen dataclass per concern, validated up front with messages that say what to change."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from shardserve.distributed import env
from shardserve.model.layers.sharding import split_heads
from shardserve.model.spec import ModelSpec

QUANTIZATIONS = ("int8",)
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
EXECUTOR_BACKENDS = ("uni", "mp", "ray", "external_launcher")


def resolve_dtype(dtype: str | torch.dtype, spec: ModelSpec, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = _DTYPES.get(spec.checkpoint_dtype, torch.float32)
        # float16 matmuls are slow and lossy on the CPU: "auto" takes bfloat16 there instead.
        return torch.bfloat16 if (device == "cpu" and stored == torch.float16) else stored
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return _DTYPES[dtype]


def layer_partition(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: L // P each, the remainder to the middle stages first ([-2], [-3], ...)."""
    override = env.pp_layer_partition()
    if override is not None:
        if len(override) != pp or any(n <= 0 for n in override) or sum(override) != num_layers:
            raise ValueError(
                f"SHARDSERVE_PP_LAYER_PARTITION={','.join(map(str, override))} must list {pp} positive layer "
                f"counts (one per pipeline stage) summing to the model's {num_layers} layers")
        return override
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp}) exceeds the model's {num_layers} layers; "
                         f"use at most {num_layers}")
    sizes = [num_layers // pp] * pp
    for i in range(num_layers % pp):
        sizes[-2 - i if pp > 1 else 0] += 1
    return sizes


def layer_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    sizes, ranges, start = layer_partition(num_layers, pp), [], 0
    for n in sizes:
        ranges.append((start, start + n))
        start += n
    return ranges


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None      # None: "uni" for one rank, else "mp"
    device: str = "cpu"                                   # "cpu" | "cuda"
    threads_per_rank: int | None = None                   # None: cores / local ranks (SHARDSERVE_NUM_THREADS)
    # Multi-node without Ray: node 0 runs the engine, nodes 1..nnodes-1 run `serve --headless`.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None                        # node 0's address, reachable from every node
    master_port: int = 29501                              # node 0's control port (store + headless nodes)
    distributed_timeout_seconds: float = 300.0            # how long start-up waits for nodes and ranks to join

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {backend!r}")
        if backend == "uni" and self.world_size > 1:
            raise ValueError("distributed_executor_backend='uni' runs one rank; use 'mp' or 'ray' for "
                             f"tensor_parallel_size * pipeline_parallel_size = {self.world_size}")
        self._check_nodes()
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda":
            visible = torch.cuda.device_count()
            if backend not in ("ray", "external_launcher") and self.ranks_per_node > visible:
                raise ValueError(f"{self.ranks_per_node} ranks on this node (tensor_parallel_size * "
                                 f"pipeline_parallel_size / nnodes) need that many GPUs but {visible} are visible "
                                 "(CUDA_VISIBLE_DEVICES); use fewer ranks or more nodes")

    def _check_nodes(self) -> None:
        if not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"nnodes must be an integer >= 1, got {self.nnodes!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if not 0 < self.distributed_timeout_seconds:
            raise ValueError(f"distributed_timeout_seconds must be > 0, got {self.distributed_timeout_seconds}")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be a port number in 1..65535, got {self.master_port}")
        if self.nnodes == 1:
            return
        if self.node_rank != 0:
            raise ValueError(f"node_rank {self.node_rank} does not run the engine: start it with "
                             "`shardserve serve --headless --nnodes N --node-rank R --master-addr A --master-port P`")
        if self.world_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size * pipeline_parallel_size = {self.world_size} ranks cannot be "
                             f"spread evenly over nnodes={self.nnodes}; use a world size that is a multiple of it")
        if self.backend != "mp":
            raise ValueError(f"nnodes={self.nnodes} runs on the 'mp' executor (node agents); with "
                             f"distributed_executor_backend={self.backend!r} leave nnodes at 1 (Ray spans nodes itself)")
        if not self.master_addr:
            raise ValueError("nnodes > 1 needs master_addr (--master-addr): node 0's address that every node reaches")

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The rank that returns each step's sampled tokens: the last stage's tp_rank 0."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @property
    def backend(self) -> str:
        return self.distributed_executor_backend or ("uni" if self.world_size == 1 else "mp")

    def rank_threads(self, local_ranks: int) -> int:
        explicit = self.threads_per_rank or env.threads_override()
        return explicit or max(1, (os.cpu_count() or 1) // max(1, local_ranks))

    def check_model(self, spec: ModelSpec) -> None:
        """Fail in the driver, before any worker starts, when the layout cannot split this model."""
        tp = self.tensor_parallel_size
        for rank in range(tp):
            split_heads(spec.num_heads, spec.num_kv_heads, tp, rank)
        if tp > spec.intermediate_size or tp > spec.vocab_size:
            raise ValueError(f"tensor_parallel_size ({tp}) exceeds the MLP width or vocab of the model")
        layer_partition(spec.num_layers, self.pipeline_parallel_size)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None        # bytes per rank; None: a fraction of free memory
    memory_fraction: float = 0.9              # of free device memory (CUDA) after the weights
    cpu_memory_fraction: float = 0.25         # of available RAM, shared by the local ranks (CPU)
    cpu_kv_cache_cap: int = 4 << 30           # at most this per node by default (CPU; vLLM's CPU backend's 4 GiB)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0 < self.memory_fraction <= 1 or not 0 < self.cpu_memory_fraction <= 1:
            raise ValueError("memory_fraction and cpu_memory_fraction must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ModelConfig:
    spec: ModelSpec
    dtype: torch.dtype
    max_model_len: int
    seed: int = 0
    quantization: str | None = None          # "int8": weight-only int8 made at load (dense checkpoints only)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                             f"got {self.quantization!r}")
        if self.quantization is not None and self.spec.format == "gguf":
            raise ValueError(f"quantization={self.quantization!r} applies to Hugging Face checkpoints; a GGUF file "
                             "is already quantized (its format is used as stored): drop quantization")
        limit = self.spec.max_position_embeddings
        if self.max_model_len < 1 or self.max_model_len > limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] (the model's max_position_embeddings), "
                             f"got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model.spec)
