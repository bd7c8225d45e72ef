"""AsyncEngine without HTTP: the engine is built on the thread that steps it; a failed build raises at once."""
from __future__ import annotations

import asyncio
import threading

import pytest

from shardserve.engine.async_engine import AsyncEngine
from shardserve.engine.engine_args import EngineArgs
from shardserve.engine.llm_engine import LLMEngine
from shardserve.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)


def test_engine_is_built_on_the_thread_that_steps_it(llama_gqa):
    """Loading on one thread and stepping on another gives torch two OpenMP pools (every op ~30% slower)."""
    built_on, stepped_on = [], set()

    def make() -> LLMEngine:
        built_on.append(threading.current_thread())
        engine = LLMEngine.from_engine_args(EngineArgs(model=llama_gqa, max_model_len=256, kv_cache_memory=16 << 20))
        step = engine.step

        def recording_step():
            stepped_on.add(threading.current_thread())
            return step()
        engine.step = recording_step
        return engine

    engine = AsyncEngine(make)
    try:
        async def run():
            params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
            return [out async for out in engine.generate("r0", {"prompt_token_ids": [1, 17, 250]}, params)]

        outs = asyncio.run(run())
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
        assert built_on == [engine.thread] and stepped_on == {engine.thread}
    finally:
        engine.shutdown()


def test_a_failed_build_raises_from_the_constructor():
    def make() -> LLMEngine:
        raise ValueError("no memory left for the KV cache")

    with pytest.raises(ValueError, match="no memory left"):
        AsyncEngine(make)
