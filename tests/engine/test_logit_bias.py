"""logit_bias (OpenAI semantics): validation, the sampler's biased rows, and its effect offline at tp=1 and tp=2."""
from __future__ import annotations

import math

import pytest
import torch

from shardserve import LLM, SamplingParams
from shardserve.model.layers.sampler import SampleRequest, argmax_suffices, sample

PROMPT = {"prompt_token_ids": [1, 5, 9, 33, 71, 12]}
LLM_KW = dict(max_model_len=128, kv_cache_memory=8 << 20)
pytestmark = pytest.mark.timeout(300)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=1, **kw)


@pytest.fixture(scope="module")
def llm(llama_gqa):
    with LLM(llama_gqa, **LLM_KW) as engine:
        yield engine


@pytest.fixture(scope="module")
def top2(llm):
    """The unbiased greedy first token and the runner-up (from logprobs=2)."""
    out = llm.generate(PROMPT, greedy(logprobs=2), use_tqdm=False)[0].outputs[0]
    first = out.token_ids[0]
    ranked = sorted(out.logprobs[0].items(), key=lambda kv: -kv[1].logprob)
    assert ranked[0][0] == first
    return first, ranked[1][0]


def first_token(llm, params) -> int:
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert out.error is None, out.error
    return out.outputs[0].token_ids[0]


@pytest.mark.parametrize("bias, what", [
    ([1, 2], "dict"), ({-1: 5.0}, "keys"), ({"7": 5.0}, "keys"), ({True: 5.0}, "keys"), ({3: 101}, "values"),
    ({3: -100.5}, "values"), ({3: math.nan}, "values"), ({3: math.inf}, "values"), ({3: "1"}, "values"),
])
def test_invalid_logit_bias_raises(bias, what):
    with pytest.raises(ValueError, match=f"logit_bias.*{what}"):
        SamplingParams(logit_bias=bias)


def test_valid_logit_bias_normalized():
    assert SamplingParams(logit_bias={3: 100, 4: -100, 5: 0.5}).logit_bias == {3: 100.0, 4: -100.0, 5: 0.5}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_sampler_adds_bias_to_each_row():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 1.0
    reqs = [SampleRequest(SamplingParams(temperature=0.0, logit_bias=b), 0, [1], []) for b in
            ({2: -100.0, 7: 5.0}, None, {9: 3.0, 99: 100.0})]        # 99 is past the vocab: skipped, no crash
    assert [argmax_suffices(r) for r in reqs] == [False, True, False]
    assert sample(logits, reqs, eos_token_ids=()).token_ids == [7, 2, 9]


def test_greedy_ban_gives_runner_up(llm, top2):
    first, second = top2
    assert first_token(llm, greedy()) == first
    assert first_token(llm, greedy(logit_bias={first: -100})) == second


def test_plus_100_forces_token(llm, top2):
    target = 400 if 400 not in top2 else 401
    assert first_token(llm, greedy(logit_bias={target: 100})) == target
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True, logit_bias={target: 100})
    assert llm.generate(PROMPT, sampled, use_tqdm=False)[0].outputs[0].token_ids == [target] * 4


def test_logprobs_follow_bias(llm, top2):
    """The returned logprobs are those of the biased logits: banning the top token lifts the runner-up's."""
    first, second = top2
    plain = llm.generate(PROMPT, greedy(logprobs=2), use_tqdm=False)[0].outputs[0].logprobs[0]
    out = llm.generate(PROMPT, greedy(logprobs=1, logit_bias={first: -100}), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [second] and first not in out.logprobs[0]
    assert out.logprobs[0][second].logprob > plain[second].logprob


def test_id_past_vocab_refused_and_engine_keeps_serving(llm, top2):
    vocab = llm.engine.config.model.spec.vocab_size
    outs = llm.generate([PROMPT, PROMPT], [greedy(logit_bias={vocab: 5.0}), greedy()], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert "logit_bias" in outs[0].error and str(vocab) in outs[0].error
    assert outs[1].outputs[0].token_ids == [top2[0]]
    with pytest.raises(ValueError, match="logit_bias"):
        llm.engine.add_request("past-vocab", PROMPT, greedy(logit_bias={vocab + 10: 1.0}))
    assert first_token(llm, greedy(logit_bias={top2[0]: -100})) == top2[1]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_multiprocess_layouts_match(llama_gqa, top2, tp, pp):
    first, second = top2
    target = 400 if 400 not in top2 else 401
    with LLM(llama_gqa, tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp",
             **LLM_KW) as tp2:
        assert first_token(tp2, greedy()) == first
        assert first_token(tp2, greedy(logit_bias={first: -100})) == second
        assert first_token(tp2, greedy(logit_bias={target: 100})) == target
        outs = tp2.generate([PROMPT, PROMPT], [greedy(logit_bias={first: -100}), greedy()], use_tqdm=False)
        assert [o.outputs[0].token_ids[0] for o in outs] == [second, first]      # mixed batch: biased + argmax rows
