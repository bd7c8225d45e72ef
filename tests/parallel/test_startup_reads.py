"""Start-up reads: the driver parses a GGUF file's metadata once; workers map tensor data and parse nothing."""
from __future__ import annotations

import shutil

import pytest

from shardserve import LLM, SamplingParams
from shardserve.model import gguf_metadata


@pytest.mark.timeout(180)
def test_workers_parse_no_gguf_metadata(tiny_gguf, tmp_path):
    path = str(tmp_path / "fresh.gguf")            # a file no earlier test parsed in this process
    shutil.copy(tiny_gguf, path)
    before = gguf_metadata.parse_count
    with LLM(path, tensor_parallel_size=2, distributed_executor_backend="mp", max_model_len=128,
             kv_cache_memory=16 << 20) as llm:
        stats = llm.engine.executor.collective_rpc("startup_stats")
        out = llm.generate([{"prompt_token_ids": [1, 5, 9]}], SamplingParams(temperature=0.0, max_tokens=4),
                           use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert gguf_metadata.parse_count == before + 1          # spec, tokenizer and format check: one parse
    assert [s["gguf_metadata_parses"] for s in stats] == [0, 0], stats
    assert not any(s["transformers_imported"] for s in stats), stats
