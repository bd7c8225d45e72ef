"""SamplingParams.prompt_logprobs (vLLM's): per prompt token, its logprob given the tokens before it, plus the top-k."""
from __future__ import annotations

import functools

import pytest
import torch

from shardserve import LLM, SamplingParams

TOL = 1e-4
K = 3
# token-id prompts (1 = <s> in the tiny tokenizer); the long one is longer than the 32-token prefill chunk below
PROMPTS = [[1, 5, 9, 33], [1, 200, 13, 7, 88, 91, 4, 100, 250, 17, 3, 600, 42, 42, 9, 870, 31, 2, 5, 77], [1, 42],
           [1] + [(i * 37 + 11) % 1000 + 3 for i in range(99)]]


@functools.lru_cache(maxsize=4)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def hf_logprobs(path: str, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float64 log_softmax of HF transformers' logits: row p predicts token p + 1."""
    with torch.inference_mode():
        logits = _hf_model(path)(torch.tensor([ids])).logits[0]             # [T, V]
    return torch.log_softmax(logits.double(), dim=-1)


def check_prompt_logprobs(path: str, ids: list[int], got, k: int = K, what: str = "") -> None:
    """got: RequestOutput.prompt_logprobs. Each entry: the prompt token (logprob, rank) and the top-k, as HF's."""
    ref = hf_logprobs(path, ids)
    assert got is not None and len(got) == len(ids), f"{what}: {None if got is None else len(got)} entries"
    assert got[0] is None, what
    for pos in range(1, len(ids)):
        entry, row, token = got[pos], ref[pos - 1], ids[pos]
        assert entry is not None and token in entry, f"{what}: position {pos} lacks its prompt token"
        want = float(row[token])
        assert abs(entry[token].logprob - want) < TOL, f"{what}: position {pos}: {entry[token].logprob} vs {want}"
        # rank: 1 + tokens more likely (a float32 near-tie with the token may move it by the tie's size)
        lo = int((row > want + TOL).sum()) + 1
        hi = int((row > want - TOL).sum()) + 1
        assert lo <= entry[token].rank <= hi, f"{what}: position {pos}: rank {entry[token].rank} not in [{lo}, {hi}]"
        top = sorted(((t, lp) for t, lp in entry.items() if t != token or lp.rank <= k), key=lambda x: x[1].rank)
        top = [(t, lp) for t, lp in top if lp.rank <= k]
        assert len(top) == k, f"{what}: position {pos}: {len(top)} top entries, want {k}"
        ref_top = torch.topk(row, k).values
        for r, (t, lp) in enumerate(top):
            assert abs(lp.logprob - float(row[t])) < TOL, f"{what}: position {pos}, top token {t}"
            assert abs(lp.logprob - float(ref_top[r])) < TOL, f"{what}: position {pos}: rank {r + 1} value"
        assert len(entry) <= k + 1


def run(path: str, prompts, params, **kwargs):
    kwargs.setdefault("kv_cache_memory", 4 << 20)
    with LLM(path, max_model_len=256, **kwargs) as llm:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def params(k: int = K, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=k, **kw)


def test_one_rank_matches_hf(llama_gqa):
    outs = run(llama_gqa, PROMPTS, params(logprobs=2))
    for i, (ids, out) in enumerate(zip(PROMPTS, outs)):
        check_prompt_logprobs(llama_gqa, ids, out.prompt_logprobs, what=f"prompt {i}")
        assert len(out.outputs[0].logprobs) == len(out.outputs[0].token_ids)    # generated logprobs still there


def test_chunked_prefill_and_mixed_batch(qwen2):
    # the 100-token prompt is prefilled in 32-token chunks; requests without prompt_logprobs share the batch
    ps = [params(), SamplingParams(temperature=0.0, max_tokens=3), params(k=1), SamplingParams(max_tokens=2, seed=1)]
    outs = run(qwen2, PROMPTS, ps, max_num_batched_tokens=32)
    for i, (ids, out) in enumerate(zip(PROMPTS, outs)):
        if ps[i].prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            check_prompt_logprobs(qwen2, ids, out.prompt_logprobs, k=ps[i].prompt_logprobs, what=f"prompt {i}")


def test_prefix_cache_does_not_drop_prompt_logits(llama_gqa):
    prefix = list(range(10, 74))                                  # 64 tokens = 4 full blocks of 16
    first, second = prefix + [5, 6], prefix + [7, 8, 9]
    with LLM(llama_gqa, max_model_len=256, kv_cache_memory=4 << 20) as llm:
        llm.generate([{"prompt_token_ids": first}], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        hits = llm.engine.stats()["prefix_cache_hit_tokens"]
        (out,) = llm.generate([{"prompt_token_ids": second}], params(), use_tqdm=False)
        check_prompt_logprobs(llama_gqa, second, out.prompt_logprobs, what="second request")
        assert out.num_cached_tokens == 0
        # a request without prompt_logprobs still reuses the prefix
        llm.generate([{"prompt_token_ids": prefix + [11]}], SamplingParams(temperature=0.0, max_tokens=1),
                     use_tqdm=False)
        assert llm.engine.stats()["prefix_cache_hit_tokens"] - hits >= 64


def test_zero_gives_only_the_prompt_token_and_n_shares_one_list(llama_gqa):
    ids = PROMPTS[1]
    (out,) = run(llama_gqa, [ids], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=2, prompt_logprobs=0))
    assert len(out.outputs) == 2
    got = out.prompt_logprobs
    assert got[0] is None and all(list(e) == [t] for e, t in zip(got[1:], ids[1:]))
    ref = hf_logprobs(llama_gqa, ids)
    for pos in range(1, len(ids)):
        lp = got[pos][ids[pos]]
        assert abs(lp.logprob - float(ref[pos - 1, ids[pos]])) < TOL
        assert lp.rank >= 1 and isinstance(lp.decoded_token, str)


def test_one_token_prompt(llama_gqa):
    (out,) = run(llama_gqa, [[1]], params())
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "2"])
def test_invalid_values_raise(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)


def test_valid_values():
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
    assert SamplingParams().prompt_logprobs is None


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_layouts_match_hf(llama_gqa, tp, pp):
    # vocab 1003 splits unevenly over tp=2; pp=2 computes logits on the last stage only; chunks of 32 tokens
    outs = run(llama_gqa, PROMPTS[1:], params(), tensor_parallel_size=tp, pipeline_parallel_size=pp,
               max_num_batched_tokens=32, kv_cache_memory=8 << 20)
    for i, (ids, out) in enumerate(zip(PROMPTS[1:], outs)):
        check_prompt_logprobs(llama_gqa, ids, out.prompt_logprobs, what=f"tp={tp} pp={pp} prompt {i}")
