"""Engine behaviour on one rank: preemption, prefix reuse, seeded sampling, stops, n > 1, logprobs, bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from shardserve import LLM, SamplingParams

PROMPTS = [[1, 5, 9, 33, 71, 12], [1, 200, 13, 7, 88, 91, 4, 100, 250, 17, 3], [1, 42, 300], [1, 8, 8, 8, 9, 10, 11]]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def gen(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module")
def llm(llama_gqa):
    with LLM(llama_gqa, max_model_len=256, kv_cache_memory=4 << 20) as engine:
        yield engine


def test_preemption_keeps_output_identical(llama_gqa, llm):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = token_ids(gen(llm, PROMPTS, params))
    # 64 tokens of KV in total (block 4 x 16 blocks) cannot hold 4 sequences of ~50 tokens at once
    block_bytes = 5 * 2 * 2 * 16 * 4 * 4       # layers * (k, v) * kv heads * head_dim * block_size * float32
    with LLM(llama_gqa, max_model_len=64, block_size=4, kv_cache_memory=16 * block_bytes) as small:
        got = token_ids(gen(small, PROMPTS, params))
        assert small.engine.stats()["num_preemptions"] > 0
        assert small.engine.block_manager.usage == 0.0
    assert got == expected


def test_prefix_reuse_allocates_shared_blocks_once(llm):
    prefix = list(range(10, 74))                                  # 64 tokens = 4 full blocks of 16
    prompts = [prefix + [5, 6], prefix + [7, 8, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = llm.engine.stats()["prefix_cache_hit_tokens"]
    first = gen(llm, prompts[:1], params)
    second = gen(llm, prompts[1:], params)
    assert llm.engine.stats()["prefix_cache_hit_tokens"] - before >= 64
    assert second[0].num_cached_tokens >= 64
    # same tokens as a cold engine without prefix caching
    cold = LLM(llm.engine.config.model.spec.weights_path, max_model_len=256, kv_cache_memory=4 << 20,
               enable_prefix_caching=False)
    try:
        assert token_ids(gen(cold, prompts, params)) == token_ids(first) + token_ids(second)
    finally:
        cold.shutdown()


def test_greedy_without_logits_equals_greedy_with_them(llm):
    """A plain greedy row takes the LM head's argmax path (the bf16 screen where the CPU has AVX512-BF16); a row
    asking for logprobs, or sampling, takes the full logits. All greedy, all with logprobs, and both kinds plus a
    seeded sampled request in the same batches: the greedy tokens agree, and the sampled request matches its run
    alone (its noise is keyed by seed and position, not by batch)."""
    from shardserve.kernels.cpu import greedy_head
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    plain = token_ids(gen(llm, PROMPTS, greedy))
    head = llm.engine.executor.worker.runner.model.lm_head
    assert (head.screen is not None) == greedy_head.supported()      # built at load where supported
    all_logits = gen(llm, PROMPTS, with_logprobs)
    assert token_ids(all_logits) == plain
    assert all(o.outputs[0].logprobs for o in all_logits)
    alone = token_ids(gen(llm, PROMPTS[:1], sampled))
    mixed = llm.generate([{"prompt_token_ids": p} for p in PROMPTS + PROMPTS[:1]],
                         [greedy, with_logprobs, greedy, with_logprobs, sampled], use_tqdm=False)
    assert token_ids(mixed) == plain + alone
    assert [bool(o.outputs[0].logprobs) for o in mixed] == [False, True, False, True, False]


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    a = token_ids(gen(llm, PROMPTS, params))
    b = token_ids(gen(llm, PROMPTS[::-1], params))[::-1]          # other batch order, same tokens
    assert a == b
    other = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    assert token_ids(gen(llm, PROMPTS, other)) != a


def test_n_gives_distinct_samples_and_logprobs(llm):
    outs = gen(llm, PROMPTS[:1], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True,
                                                logprobs=3))
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in comps}) > 1
    for c in comps:
        assert len(c.logprobs) == len(c.token_ids) == 12
        for tok, entry in zip(c.token_ids, c.logprobs):
            assert tok in entry and len(entry) >= 3
            assert all(lp.logprob <= 0.0 for lp in entry.values())
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))


def test_stop_strings_cut_exactly(llm):
    base = gen(llm, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) > 8
    stop = text[5:8]
    cut = text[: text.find(stop)]
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))
    comp = out[0].outputs[0]
    assert comp.text == cut and comp.finish_reason == "stop" and comp.stop_reason == stop
    inc = gen(llm, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == cut + stop


def test_stop_token_ids_and_max_tokens(llm):
    base = gen(llm, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop_tok = base.token_ids[6]
    first = base.token_ids.index(stop_tok)
    out = gen(llm, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                               stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == stop_tok
    assert base.finish_reason == "length" and len(base.token_ids) == 20


def test_too_long_prompt_fails_alone(llm):
    long_prompt = [1] + [5] * 300
    outs = gen(llm, [PROMPTS[0], long_prompt, PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=4))
    assert outs[1].outputs[0].finish_reason == "error" and "max_model_len" in outs[1].error
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) >= 1
    assert outs[2].error is None
    # the engine still serves afterwards
    assert gen(llm, PROMPTS[:1], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0),
                                         ("n", 0), ("top_k", -3), ("min_p", 2.0)])
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_token_ids_and_empty_prompt(llm):
    outs = llm.generate([{"prompt_token_ids": [1, 5000]}, {"prompt_token_ids": []}, "ok"],
                        SamplingParams(max_tokens=2), use_tqdm=False)
    assert "vocab" in outs[0].error and "empty" in outs[1].error and outs[2].error is None


def test_missing_model_path_and_unsupported_architecture(tmp_path, llama_gqa):
    with pytest.raises((FileNotFoundError, ValueError), match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))
    bad = tmp_path / "bad"
    shutil.copytree(llama_gqa, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(bad))


def test_chat_and_text_prompts(llm):
    outs = llm.chat([{"role": "user", "content": "hello there"}], SamplingParams(temperature=0.0, max_tokens=5),
                    use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) >= 1
    text = llm.generate("hello there", SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert text[0].prompt == "hello there" and text[0].prompt_token_ids[0] == 1
