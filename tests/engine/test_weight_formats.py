"""Compact weights through the engine: bfloat16, GGUF blocks (Q8_0, Q4_0, Q4_K) and int8, on every layout."""
from __future__ import annotations

import glob
import os

import pytest
import torch

import tiny_checkpoints as checkpoints
from parity import Run, check_parity, engine_runs, hf_greedy
from shardserve import LLM, SamplingParams
from shardserve.kernels.cpu import bf16_linear

PROMPTS = [[1, 5, 9, 33], [1, 200, 13, 7, 88, 91, 4, 100, 250, 17, 3, 600, 42, 42, 9, 870, 31, 2, 5, 77], [1, 42]]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=5)
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory) -> str:
    return checkpoints.build_llama_bf16(str(tmp_path_factory.mktemp("llama_bf16")))


def run(path: str, tp: int = 1, pp: int = 1, **kwargs) -> tuple[list[Run], list[dict]]:
    """Greedy runs of PROMPTS and every rank's memory_stats, with its weight_formats under "formats"."""
    with LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=128,
             kv_cache_memory=16 << 20, **kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        rpc = llm.engine.executor.collective_rpc
        return engine_runs(outs), [dict(s, formats=f) for s, f in zip(rpc("memory_stats"), rpc("weight_formats"))]


def check_layouts(path: str, what: str, **kwargs) -> tuple[list[Run], dict[tuple[int, int], list[dict]]]:
    """One rank's greedy runs, after checking every layout of LAYOUTS against them; and each layout's
    memory_stats, (1, 1) included."""
    single, stats = run(path, **kwargs)
    by_layout = {(1, 1): stats}
    for tp, pp in LAYOUTS:
        runs, by_layout[(tp, pp)] = run(path, tp, pp, **kwargs)
        assert len(runs) == len(single) == len(PROMPTS)
        for i, (a, b) in enumerate(zip(runs, single)):
            check_parity(a, b, f"{what} tp={tp} pp={pp} vs one rank, prompt {i}")
    return single, by_layout


def file_tensor_bytes(path: str) -> int:
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


@pytest.mark.timeout(600)
def test_bfloat16_layouts_and_hf(llama_bf16):
    """bf16 safetensors run in bf16 (dtype auto) on every layout, and match HF transformers in bf16; on AVX512-BF16
    CPUs every linear runs on the VDPBF16PS kernel (PanelBF16)."""
    single, by_layout = check_layouts(llama_bf16, "bf16")
    expected = "PanelBF16" if bf16_linear.supported() else "OneDNN"
    for layout, stats in by_layout.items():
        held = {fmt for rank in stats for fmt in rank["formats"].values()}
        assert held == {expected}, (layout, held)
    hf = hf_greedy(llama_bf16, PROMPTS, MAX_TOKENS, dtype=torch.bfloat16)
    for i, (a, b) in enumerate(zip(single, hf)):
        check_parity(a, b, f"bf16 vs HF bf16, prompt {i}")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K"])
def test_gguf_blocks_stay_compact_on_every_layout(llama_blocks, qtype):
    """Every matrix is kept in its blocks (norms are float32 in the file too): one rank holds ~ the file's bytes,
    each of 2 TP ranks its half plus the replicated norms."""
    path = checkpoints.quantized_gguf(llama_blocks, qtype)
    _, stats = check_layouts(path, qtype)
    file_bytes = file_tensor_bytes(path)
    assert stats[(1, 1)][0]["weight_bytes"] <= 1.1 * file_bytes
    norms = 5 * 512 * 4                              # replicated norm weights (2 layers x 2 + final), float32
    assert all(s["weight_bytes"] <= 1.1 * file_bytes / 2 + norms for s in stats[(2, 1)])


@pytest.mark.timeout(600)
def test_int8_quantization_on_every_layout(llama_gqa):
    single, stats = check_layouts(llama_gqa, "int8", quantization="int8")
    dense, dense_stats = run(llama_gqa)
    # llama_gqa's linears: 5 layers of qkv [128, 64], o [64, 64], gate_up [272, 64], down [64, 136]; each weight
    # goes from 4 bytes to 1, plus a float32 scale per output channel (embedding and LM head stay float32)
    weights, channels = 5 * (128 * 64 + 64 * 64 + 272 * 64 + 64 * 136), 5 * (128 + 64 + 272 + 64)
    assert dense_stats[0]["weight_bytes"] - stats[(1, 1)][0]["weight_bytes"] == 3 * weights - 4 * channels
    # weight-only int8 stays close to float32: the first answer starts the same
    assert single[0].tokens[:2] == dense[0].tokens[:2]


def test_int8_with_gguf_is_refused(tiny_gguf):
    with pytest.raises(ValueError, match="drop quantization"):
        LLM(tiny_gguf, quantization="int8")


def test_unsupported_gguf_type_is_named(llama_blocks):
    path = checkpoints.quantized_gguf(llama_blocks, "Q5_0")
    with pytest.raises(ValueError, match=r"tensor \S+ is stored as Q5_0.*supported GGUF types: Q8_0"):
        LLM(path)


def test_bad_quantization_is_refused(llama_gqa):
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        LLM(llama_gqa, quantization="int4")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [["--quantization", "int8"], ["--dtype", "bfloat16"]])
def test_cli_generate_with_format_flags(llama_gqa, flags):
    """`shardserve generate` takes the format flags end to end and prints the completion."""
    import subprocess
    import sys

    def generate(extra: list[str]) -> str:
        cmd = [sys.executable, "-m", "shardserve.entrypoints.cli", "generate", "--model", llama_gqa, "--raw",
               "--max-tokens", "4", "--kv-cache-memory", str(16 << 20), "--max-model-len", "128", *extra,
               "The capital of France is"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = generate(flags)
    assert out.startswith("--- 'The capital of France is'\n") and len(out.splitlines()[1]) > 0


@pytest.mark.timeout(300)
def test_gguf_uneven_split_dequantizes_only_what_it_must(llama_blocks):
    """tp=3 over 4 heads / 2 kv heads: kv head 0 is shared by ranks 0 and 1 (one query head, 128 columns each),
    rank 2 holds kv head 1 (columns 256..512). o_proj's input columns on ranks 0 and 1 are half a Q4_K block, so
    those two hold that layer dequantized (logged); the MLP width (4 blocks of 256) splits 2/1/1 blocks, so
    down_proj stays in blocks everywhere; answers equal one rank's."""
    path = checkpoints.quantized_gguf(llama_blocks, "Q4_K")
    single, _ = run(path)
    with LLM(path, tensor_parallel_size=3, max_model_len=128, kv_cache_memory=16 << 20) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        held = llm.engine.executor.collective_rpc("weight_formats")
    for i, (a, b) in enumerate(zip(engine_runs(outs), single)):
        check_parity(a, b, f"Q4_K tp=3 vs one rank, prompt {i}")
    for rank, layers in enumerate(held):
        for name, fmt in layers.items():
            dequantized = rank < 2 and name.endswith("o_proj")
            assert (fmt != "Q4_K") == dequantized, (rank, name, fmt)


@pytest.mark.timeout(300)
def test_tied_bfloat16_embedding_and_head_share_one_copy(qwen2):
    """Qwen2 ties its embeddings: in bf16 the embedding and the LM head hold one plain copy between them."""
    _, stats = run(qwen2, dtype="bfloat16")
    float32_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(qwen2, "*.safetensors")))
    assert stats[0]["weight_bytes"] <= 1.1 * float32_bytes / 2
