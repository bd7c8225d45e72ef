"""Sequence.pp_stage as the engine sets it with pp batches in flight, driven through a fake executor (no processes)."""
from __future__ import annotations

from concurrent.futures import Future

import pytest

from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.engine import llm_engine
from shardserve.engine.engine_args import EngineArgs
from shardserve.executor.base import Executor
from shardserve.sampling_params import SamplingParams


class _LazyFuture(Future):
    """Resolves when the engine asks for the result, i.e. while it waits for this batch."""

    def __init__(self, resolve):
        super().__init__()
        self.resolve = resolve

    def result(self, timeout=None):
        if not self.done():
            self.set_result(self.resolve())
        return super().result(timeout)


class FakeExecutor(Executor):
    """Samples token 5 for every request whose chunk reaches the end of its known tokens. When the engine
    waits for a batch, records the pp_stage values of every batch still in flight, oldest first."""

    def __init__(self, config):
        super().__init__(config)
        self.engine = None
        self.known: dict[str, int] = {}             # req_id -> tokens the workers would know
        self.pending: list[SchedulerOutput] = []    # submitted, not yet resolved, oldest first
        self.observations: list[list[set]] = []

    def start(self) -> int:
        return 256

    def collective_rpc(self, method: str, *args) -> list:
        return []

    def execute_model(self, sched: SchedulerOutput) -> Future:
        computed = {}
        for new in sched.new_requests:
            self.known[new.req_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
            computed[new.req_id] = new.num_computed_tokens
        for cached in sched.cached_requests:
            self.known[cached.req_id] += len(cached.new_token_ids)
            computed[cached.req_id] = cached.num_computed_tokens
        tokens = {r: 5 for r, n in sched.num_scheduled_tokens.items() if computed[r] + n == self.known[r]}
        self.pending.append(sched)

        def resolve() -> ModelRunnerOutput:
            assert self.pending[0] is sched
            self.observations.append([{self.engine.scheduler.get(r).pp_stage for r in batch.num_scheduled_tokens}
                                      for batch in self.pending])
            self.pending.pop(0)
            return ModelRunnerOutput(sched.step_id, tokens)
        return _LazyFuture(resolve)

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("pp", [2, 3])
def test_in_flight_sequences_report_their_pipeline_stage(pp, llama_gqa, monkeypatch):
    monkeypatch.setattr(llm_engine, "create_executor", FakeExecutor)
    config = EngineArgs(model=llama_gqa, pipeline_parallel_size=pp, max_model_len=64, max_num_seqs=4).create_config()
    engine = llm_engine.LLMEngine(config)
    executor = engine.executor
    executor.engine = engine
    for i in range(4 * pp):
        engine.add_request(f"r{i}", [1, 10 + i, 20 + i, 30], SamplingParams(max_tokens=6, ignore_eos=True))
    seqs = [seq for req in engine.requests.values() for seq in req.seqs]
    while engine.has_unfinished_requests():
        engine.step()
        for seq in seqs:                                    # between steps: a stage iff in flight
            assert (seq.pp_stage is None) == (not seq.in_flight), seq
    assert all(seq.num_output_tokens == 6 for seq in seqs)
    assert all(seq.pp_stage is None for seq in seqs)
    # While the engine waits for the oldest of k batches, the batch submitted j submissions ago is at min(j, pp - 1).
    for obs in executor.observations:
        k = len(obs)
        assert obs == [{min(k - 1 - i, pp - 1)} for i in range(k)], obs
    assert max(len(obs) for obs in executor.observations) == pp     # the pipeline was full at least once
