"""Single-process greedy parity with HF transformers (the DESIGN.md rule), GGUF vs safetensors, SmolLM2 answers."""
from __future__ import annotations

import pytest

from parity import check_parity, engine_runs, hf_greedy
from shardserve import LLM, SamplingParams

# token-id prompts of different lengths (1 = <s> in the tiny tokenizer)
PROMPTS = [[1, 5, 9, 33], [1, 200, 13, 7, 88, 91, 4, 100, 250, 17, 3, 600, 42, 42, 9, 870, 31, 2, 5, 77], [1, 42]]
MAX_TOKENS = 24
SMALL_CACHE = 4 << 20
SMOL_CACHE = 64 << 20          # SmolLM2: 46 KiB of KV per token


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    # min_tokens bans eos like HF's min_new_tokens, so both sides produce exactly max_tokens tokens
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, logprobs=5)


def run_engine(path: str, prompts, params=None, cache=SMALL_CACHE, **kwargs):
    with LLM(path, max_model_len=256, kv_cache_memory=cache, **kwargs) as llm:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params or greedy(), use_tqdm=False)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "mistral"])
def test_tiny_models_match_hf(name, request):
    path = request.getfixturevalue(name)
    ours = engine_runs(run_engine(path, PROMPTS))
    for i, (a, b) in enumerate(zip(ours, hf_greedy(path, PROMPTS, MAX_TOKENS))):
        check_parity(a, b, f"{name} prompt {i}")


def test_gguf_equals_safetensors(tiny_gguf, tiny_gguf_twin):
    a = run_engine(tiny_gguf, PROMPTS)
    b = run_engine(tiny_gguf_twin, PROMPTS)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def smol_prompts(path: str) -> list[list[int]]:
    from shardserve.model.checkpoint import read_model_spec
    from shardserve.model.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(read_model_spec(path))
    questions = ["What is the capital of France?", "Name three colors.", "Write one sentence about the moon and stars."]
    return [apply_chat_template(tok, [{"role": "user", "content": q}]) for q in questions]


def test_smollm2_matches_hf_and_gguf_equals_safetensors(smollm2_gguf, smollm2_hf):
    prompts = smol_prompts(smollm2_gguf)
    from_gguf = run_engine(smollm2_gguf, prompts, cache=SMOL_CACHE, max_num_seqs=8)
    from_hf_folder = run_engine(smollm2_hf, prompts, cache=SMOL_CACHE, max_num_seqs=8)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_hf_folder]
    for i, (a, b) in enumerate(zip(engine_runs(from_gguf), hf_greedy(smollm2_hf, prompts, MAX_TOKENS))):
        check_parity(a, b, f"smollm2 prompt {i}")


def test_smollm2_knows_paris():
    with LLM(max_model_len=512, kv_cache_memory=SMOL_CACHE) as llm:
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason in ("stop", "length")
