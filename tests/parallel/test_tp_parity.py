"""Tensor parallelism across real processes (Gloo + shared memory): answers equal one rank's and HF's."""
from __future__ import annotations

import functools

import pytest

from parity import check_parity, engine_runs, hf_greedy
from shardserve import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33], [1, 200, 13, 7, 88, 91, 4, 100, 250, 17, 3, 600, 42, 42, 9, 870, 31, 2, 5, 77], [1, 42]]
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=5)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
ARGMAX = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)    # no logits: the head's argmax
ARGMAX_FROM_LOGITS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)


def run(path: str, prompts, tp: int = 1, pp: int = 1, **kwargs):
    with LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=256,
             kv_cache_memory=64 << 20, **kwargs) as llm:
        greedy = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        seeded = llm.generate([{"prompt_token_ids": p} for p in prompts], SEEDED, use_tqdm=False)
        # the same layout's argmax without gathering logits (per-rank winners) equals argmax over the logits
        argmax, from_logits = (llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                               for params in (ARGMAX, ARGMAX_FROM_LOGITS))
        assert [o.outputs[0].token_ids for o in argmax] == [o.outputs[0].token_ids for o in from_logits]
    return engine_runs(greedy), [o.outputs[0].token_ids for o in seeded]


@functools.lru_cache(maxsize=None)
def reference(path: str, prompts: tuple[tuple[int, ...], ...], hf_path: str):
    """One rank's (greedy runs, seeded tokens) and HF's greedy runs, computed once per model."""
    prompts = [list(p) for p in prompts]
    return run(path, prompts), hf_greedy(hf_path, prompts, MAX_TOKENS)


def check_layout(path: str, prompts, tp: int, pp: int = 1, what: str = "", hf_path: str | None = None) -> None:
    (single, single_seeded), hf = reference(path, tuple(tuple(p) for p in prompts), hf_path or path)
    greedy, seeded = run(path, prompts, tp, pp)
    for i, (a, b, c) in enumerate(zip(greedy, single, hf)):
        check_parity(a, b, f"{what} tp={tp} pp={pp} vs one rank, prompt {i}")
        check_parity(a, c, f"{what} tp={tp} pp={pp} vs HF, prompt {i}")
    exact = [a.tokens == b.tokens for a, b in zip(greedy, single)]
    if all(exact):   # seeded sampling draws the same noise on every layout: equal unless logits near-tie
        assert seeded == single_seeded, f"{what} tp={tp} pp={pp}: seeded sampling differs from one rank"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "mistral"])
def test_tiny_models_tp(name, tp, request):
    check_layout(request.getfixturevalue(name), PROMPTS, tp, what=name)


def smol_prompts(path: str):
    from shardserve.model.checkpoint import read_model_spec
    from shardserve.model.tokenizer import apply_chat_template, load_tokenizer

    tok = load_tokenizer(read_model_spec(path))
    return [apply_chat_template(tok, [{"role": "user", "content": q}])
            for q in ("What is the capital of France?", "Name a large animal.")]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [2, 3])
def test_smollm2_tp(tp, smollm2_gguf, smollm2_hf):
    # the HF reference reads the dequantized safetensors twin: the same weights
    check_layout(smollm2_gguf, smol_prompts(smollm2_gguf), tp, what="smollm2", hf_path=smollm2_hf)
