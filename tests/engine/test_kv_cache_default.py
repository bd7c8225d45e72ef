"""The CPU KV cache a user can predict: at most min(25% of available RAM, 4 GiB) per node, shared by the local
ranks, and no more than max_num_seqs x max_model_len can use; kv_cache_memory wins; one start-up line says so."""
from __future__ import annotations

import logging

import pytest

from shardserve import LLM
from shardserve.config import CacheConfig
from shardserve.worker.worker import kv_cache_budget

GiB = 1 << 30


@pytest.mark.parametrize("ram,ranks,expected", [
    (64 * GiB, 1, 4 * GiB),                  # a big host: the 4 GiB cap
    (64 * GiB, 4, GiB),                      # shared by the node's ranks
    (8 * GiB, 1, 2 * GiB),                   # a laptop: 25% of what is available
    (8 * GiB, 2, GiB),
])
def test_default_budget_rule(ram, ranks, expected):
    assert kv_cache_budget(CacheConfig(), ranks, ram) == expected


def test_kv_cache_memory_wins():
    assert kv_cache_budget(CacheConfig(kv_cache_memory=123 << 20), 4, 64 * GiB) == 123 << 20


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.timeout(120)
def test_default_cache_holds_what_the_batch_can_use_and_says_so(llama_gqa):
    """A tiny model: max_num_seqs x max_model_len (in blocks, + the padding block) is far under the cap, so that is
    the cache; the start-up line gives its tokens, bytes and the flag that changes it."""
    handler = _Lines()
    logging.getLogger("shardserve").addHandler(handler)
    try:
        with LLM(llama_gqa, max_model_len=256, max_num_seqs=4, block_size=16) as llm:
            executor = llm.engine.executor
            assert executor.num_blocks == 4 * (256 // 16) + 1
            per_block = llm.engine.executor.kv_cache_bytes // executor.num_blocks
    finally:
        logging.getLogger("shardserve").removeHandler(handler)
    [line] = [line for line in handler.lines if line.startswith("KV cache:")]
    assert f"{executor.num_blocks * 16} tokens" in line and "--kv-cache-memory" in line and "4 GiB" in line
    assert f"{executor.num_blocks * per_block / (1 << 20):.0f} MiB" in line
