"""Pipeline parallelism: the layer partition, parity for pp and tp x pp layouts, and proof of overlap."""
from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams
from shardserve.config import layer_partition
from test_tp_parity import PROMPTS, check_layout, smol_prompts


@pytest.mark.parametrize("layers,stages,expected", [
    (5, 3, [2, 2, 1]), (4, 3, [1, 2, 1]), (30, 4, [7, 8, 8, 7]), (30, 2, [15, 15]), (5, 2, [3, 2]),
    (7, 1, [7]), (3, 3, [1, 1, 1]), (30, 7, [4, 4, 4, 4, 5, 5, 4])])
def test_automatic_partition(layers, stages, expected, monkeypatch):
    monkeypatch.delenv("SHARDSERVE_PP_LAYER_PARTITION", raising=False)
    assert layer_partition(layers, stages) == expected
    assert sum(expected) == layers


@pytest.mark.parametrize("value", ["3,a", "2,2,2", "4", "5,0", "0,5", "3,-1", "2,2", " ,", "1.5,3.5"])
def test_malformed_partition_override(value, monkeypatch):
    monkeypatch.setenv("SHARDSERVE_PP_LAYER_PARTITION", value)
    with pytest.raises(ValueError, match="SHARDSERVE_PP_LAYER_PARTITION"):
        layer_partition(5, 2)


def test_partition_override_and_too_many_stages(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_PP_LAYER_PARTITION", "1,4")
    assert layer_partition(5, 2) == [1, 4]
    monkeypatch.delenv("SHARDSERVE_PP_LAYER_PARTITION")
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        layer_partition(3, 4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,pp", [(1, 2), (1, 3), (2, 2)])
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "mistral"])
def test_tiny_models_pp(name, tp, pp, request):
    check_layout(request.getfixturevalue(name), PROMPTS, tp, pp, what=name)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp,pp,partition", [(1, 2, None), (2, 2, None), (1, 2, "10,20")])
def test_smollm2_pp(tp, pp, partition, smollm2_gguf, smollm2_hf, monkeypatch):
    if partition:
        monkeypatch.setenv("SHARDSERVE_PP_LAYER_PARTITION", partition)
    check_layout(smollm2_gguf, smol_prompts(smollm2_gguf), tp, pp, what=f"smollm2 partition={partition}",
                 hf_path=smollm2_hf)


@pytest.mark.timeout(300)
def test_two_batches_in_flight_with_pp2(llama_gqa):
    """With pp=2 and more requests than one batch, the engine keeps two batches in flight (its own counter)."""
    with LLM(llama_gqa, pipeline_parallel_size=2, max_model_len=128, max_num_seqs=4, kv_cache_memory=8 << 20) as llm:
        prompts = [{"prompt_token_ids": [1, 10 + i, 20 + i, 30]} for i in range(8)]
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        stats = llm.engine.stats()
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert stats["max_in_flight_seen"] == 2
    assert stats["num_in_flight_batches"] == 0


@pytest.mark.timeout(120)
def test_pp_larger_than_layers_is_refused_before_start(mistral):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(mistral, pipeline_parallel_size=4)
