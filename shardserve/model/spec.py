"""ModelSpec: the architecture facts of a checkpoint, read from config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str                 # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None         # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool              # q/k/v projections carry a bias (Qwen2)
    checkpoint_dtype: str             # "float32" | "bfloat16" | "float16" as stored (GGUF: see _gguf_float_dtype)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]    # generation stops on any of these
    format: str                       # "safetensors" | "gguf"
    weights_path: str                 # the folder (safetensors) or the .gguf file
    sliding_window: int | None = None # Mistral; None = full attention
    mlp_split_unit: int = 1           # TP splits the MLP width in multiples of this (GGUF: ffn_down's block size)
    extra: dict = field(default_factory=dict, compare=False)
