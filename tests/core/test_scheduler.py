"""Tests for Scheduler: continuous batching, chunked prefill, preemption, prefix reuse, pipelining, deltas, stops."""
from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardserve.core.block_manager import BlockManager
from shardserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.core.scheduler import Scheduler
from shardserve.core.sequence import Sequence, SequenceStatus
from shardserve.sampling_params import SamplingParams

_ids = itertools.count()


def next_token(last: int) -> int:
    return (last * 31 + 7) % 1000


def reference(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = next_token(last)
        out.append(last)
    return out


def make_seq(prompt, params: SamplingParams | None = None, seq_id: str | None = None) -> Sequence:
    i = next(_ids)
    return Sequence(seq_id=seq_id or f"s{i}", request_id=f"r{i}", index=0, prompt_token_ids=list(prompt),
                    sampling_params=params or SamplingParams(max_tokens=8), seed=i, arrival_time=float(i))


def make_sched(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, max_model_len=256, max_in_flight=1,
               eos=(), prefix=True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_num_seqs, budget, max_model_len, max_in_flight, eos_token_ids=eos)


class FakeWorker:
    """Mirrors ModelRunner's per-request state from SchedulerOutputs only, checks it against the driver's
    sequences, and 'samples' next_token(last) for requests whose step reaches the end of their tokens."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.state: dict[str, dict] = {}
        self.outputs: list[SchedulerOutput] = []

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        s = self.sched
        self.outputs.append(out)
        assert out.total_tokens <= s.max_num_batched_tokens
        assert 0 < len(out.num_scheduled_tokens) <= s.max_num_seqs
        assert len(out.new_requests) + len(out.cached_requests) == len(out.num_scheduled_tokens)
        for req_id in out.finished_req_ids:
            self.state.pop(req_id, None)
        computed = {}
        for new in out.new_requests:
            assert new.num_computed_tokens % s.block_manager.block_size == 0
            self.state[new.req_id] = {"tokens": new.prompt_token_ids + new.output_token_ids,
                                      "blocks": list(new.block_ids)}
            computed[new.req_id] = new.num_computed_tokens
        for cached in out.cached_requests:
            st_ = self.state[cached.req_id]               # KeyError: the worker was never told about it
            st_["tokens"] += cached.new_token_ids
            st_["blocks"] += cached.new_block_ids
            computed[cached.req_id] = cached.num_computed_tokens
        result = ModelRunnerOutput(step_id=out.step_id)
        for req_id, n in out.num_scheduled_tokens.items():
            st_, seq = self.state[req_id], s.get(req_id)
            assert seq is not None and st_["tokens"] == seq.all_token_ids and st_["blocks"] == seq.block_ids
            end = computed[req_id] + n
            assert n > 0 and end <= len(st_["tokens"])
            assert len(st_["blocks"]) * s.block_manager.block_size >= end     # slots for every token
            if end == len(st_["tokens"]):
                result.sampled_token_ids[req_id] = next_token(st_["tokens"][-1])
        return result


def check_blocks(s: Scheduler) -> None:
    """Ref counts equal the number of live tables holding each block; shared blocks carry a hash."""
    bm = s.block_manager
    refs = [0] * bm.num_blocks
    holders = list(s.running) + list(s.waiting) + list(getattr(s, "_pending", {}).values())
    for seq in holders:
        for b in seq.block_ids:
            refs[b] += 1
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id] >= 0
        if block.ref_count > 1:
            assert block.hash is not None
    for seq in s.waiting:
        assert seq.block_ids == [] and seq.num_computed_tokens == 0 and not seq.in_flight
    assert s.num_running <= s.max_num_seqs * s.max_in_flight    # max_num_seqs caps one batch


def drive(s: Scheduler, worker: FakeWorker | None = None, depth: int = 1, max_steps: int = 10_000,
          on_step=None) -> FakeWorker:
    """The engine's loop: keep up to `depth` batches in flight, finish the oldest when full or stuck."""
    worker = worker or FakeWorker(s)
    in_flight: deque = deque()
    for step in range(max_steps):
        if not s.has_unfinished() and not in_flight:
            return worker
        out = s.schedule()
        if out is not None:
            in_flight.append((out, worker.execute(out)))
        check_blocks(s)
        if in_flight and (out is None or len(in_flight) >= depth):
            s.update(*in_flight.popleft())
            check_blocks(s)
        if on_step:
            on_step(step)
    raise AssertionError("did not finish")


# ---- continuous batching and chunked prefill ----------------------------------------------------------
def test_single_sequence_generates_reference_tokens():
    s = make_sched()
    seq = make_seq(range(1, 11), SamplingParams(max_tokens=5))
    s.add(seq)
    drive(s)
    assert seq.output_token_ids == reference(seq.prompt_token_ids, 5)
    assert seq.status == SequenceStatus.FINISHED_LENGTH and seq.finish_reason == "length"
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks and s.block_manager.usage == 0.0


def test_added_mid_run_joins_next_step():
    s = make_sched()
    w = FakeWorker(s)
    a = make_seq(range(5), SamplingParams(max_tokens=10))
    s.add(a)
    out = s.schedule()
    s.update(out, w.execute(out))
    b = make_seq(range(100, 106), SamplingParams(max_tokens=10))
    s.add(b)
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == [a.seq_id, b.seq_id]            # running first, then waiting
    assert out.num_scheduled_tokens == {a.seq_id: 1, b.seq_id: 6}             # decode + whole prefill
    assert [r.req_id for r in out.cached_requests] == [a.seq_id]
    assert [r.req_id for r in out.new_requests] == [b.seq_id]
    s.update(out, w.execute(out))
    drive(s, w)
    assert a.output_token_ids == reference(a.prompt_token_ids, 10)
    assert b.output_token_ids == reference(b.prompt_token_ids, 10)


def test_chunked_prefill():
    s = make_sched(num_blocks=64, block_size=16, budget=32)
    seq = make_seq(range(100), SamplingParams(max_tokens=3))
    s.add(seq)
    w = FakeWorker(s)
    chunks, sampled_at = [], []
    for step in range(10):
        out = s.schedule()
        if out is None:
            break
        chunks.append(out.num_scheduled_tokens[seq.seq_id])
        r = w.execute(out)
        if r.sampled_token_ids:
            sampled_at.append(step)
        s.update(out, r)
    assert chunks == [32, 32, 32, 4, 1, 1]
    assert sampled_at == [3, 4, 5]
    assert seq.output_token_ids == reference(seq.prompt_token_ids, 3)
    # chunks 2.. travel as cached deltas with the blocks added since
    assert len(w.outputs[0].new_requests) == 1 and len(w.outputs[0].new_requests[0].block_ids) == 2
    assert [len(o.cached_requests[0].new_block_ids) for o in w.outputs[1:4]] == [2, 2, 1]


def test_budget_and_seq_cap_never_exceeded():
    s = make_sched(num_blocks=200, block_size=4, max_num_seqs=3, budget=10)
    seqs = [make_seq(range(i, i + 3 + 5 * i), SamplingParams(max_tokens=4 + i)) for i in range(7)]
    for seq in seqs:
        s.add(seq)
    w = drive(s)                                   # FakeWorker.execute asserts budget and seq cap per step
    assert max(o.total_tokens for o in w.outputs) == 10
    assert max(len(o.num_scheduled_tokens) for o in w.outputs) == 3
    for seq in seqs:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, seq.sampling_params.max_tokens)


def test_waiting_partial_chunk_uses_leftover_budget():
    s = make_sched(budget=8)
    a, b = make_seq(range(5)), make_seq(range(50, 70))
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert out.num_scheduled_tokens == {a.seq_id: 5, b.seq_id: 3}


# ---- preemption -------------------------------------------------------------------------------------
def _workload():
    return [make_seq([(7 * i + j) % 50 for j in range(6 + 3 * i)], SamplingParams(max_tokens=12 + i))
            for i in range(6)]


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("depth", [1, 2])
def test_preemption_gives_same_tokens(prefix, depth):
    results = {}
    for num_blocks in (200, 12):
        s = make_sched(num_blocks=num_blocks, block_size=4, budget=16, max_in_flight=depth, prefix=prefix)
        seqs = _workload()
        for seq in seqs:
            s.add(seq)
        w = drive(s, depth=depth)
        results[num_blocks] = [seq.output_token_ids for seq in seqs]
        assert all(seq.finish_reason == "length" for seq in seqs)
        assert s.block_manager.num_free_blocks == num_blocks and s.block_manager.usage == 0.0
        if num_blocks == 12:
            assert s.num_preemptions_total > 0
            preempted = [seq for seq in seqs if seq.num_preemptions]
            assert preempted
            # a preempted sequence is sent in full again, with its outputs so far as context
            resent = [n for o in w.outputs for n in o.new_requests if n.output_token_ids]
            assert resent
            for n in resent:
                seq = next(q for q in seqs if q.seq_id == n.req_id)
                assert n.output_token_ids == seq.output_token_ids[:len(n.output_token_ids)]
        else:
            assert s.num_preemptions_total == 0
    assert results[200] == results[12]
    assert results[200] == [reference(seq.prompt_token_ids, seq.sampling_params.max_tokens) for seq in _workload()]


def test_preempts_most_recent_arrival():
    s = make_sched(num_blocks=4, block_size=4, budget=64)
    a, b = make_seq(range(8), SamplingParams(max_tokens=20)), make_seq(range(10, 18), SamplingParams(max_tokens=20))
    s.add(a)
    s.add(b)
    w = FakeWorker(s)
    out = s.schedule()                                   # 2 blocks each: the cache is full
    s.update(out, w.execute(out))                        # both now hold 9 tokens, 8 computed
    out = s.schedule()                                   # a needs a 3rd block -> b (newer) is preempted
    assert list(out.num_scheduled_tokens) == [a.seq_id]
    assert b.status == SequenceStatus.WAITING and b.num_preemptions == 1 and b.block_ids == []
    assert s.num_waiting == 1 and s.num_preemptions_total == 1
    assert b.seq_id in out.finished_req_ids or b.seq_id in out.num_scheduled_tokens


# ---- prefix cache -----------------------------------------------------------------------------------
def test_prefix_reuse():
    s = make_sched(num_blocks=32, block_size=16, budget=256)
    prompt = list(range(500, 540))                       # 40 tokens: 2 full blocks shareable
    a = make_seq(prompt, SamplingParams(max_tokens=4))
    s.add(a)
    w = FakeWorker(s)
    out = s.schedule()
    s.update(out, w.execute(out))
    b = make_seq(prompt, SamplingParams(max_tokens=4))
    s.add(b)
    used_before = s.block_manager.num_free_blocks
    out = s.schedule()
    new_b = next(n for n in out.new_requests if n.req_id == b.seq_id)
    assert new_b.num_computed_tokens == 32 and b.num_cached_prompt_tokens == 32
    assert out.num_scheduled_tokens[b.seq_id] == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert used_before - s.block_manager.num_free_blocks == 1          # only b's tail block is new
    assert s.prefix_cache_hit_tokens == 32
    s.update(out, w.execute(out))
    drive(s, w)
    assert a.output_token_ids == b.output_token_ids == reference(prompt, 4)
    assert s.block_manager.num_free_blocks == 32


# ---- pipeline parallelism ---------------------------------------------------------------------------
def test_max_in_flight_two():
    s = make_sched(budget=16, max_in_flight=2)
    seqs = [make_seq(range(10 * i, 10 * i + 8), SamplingParams(max_tokens=6)) for i in range(4)]
    for seq in seqs:
        s.add(seq)
    w = FakeWorker(s)
    o1 = s.schedule()
    o2 = s.schedule()
    assert o1 is not None and o2 is not None and o2.step_id == o1.step_id + 1
    assert not set(o1.num_scheduled_tokens) & set(o2.num_scheduled_tokens)
    assert s.schedule() is None                           # two batches already in flight
    assert s.num_in_flight_batches == 2 and s.max_in_flight_seen == 2
    r1, r2 = w.execute(o1), w.execute(o2)
    with pytest.raises(AssertionError):
        s.update(o2, r2)                                  # updates must come in step order
    s.update(o1, r1)
    o3 = s.schedule()                                     # o1's sequences are free again, o2's are not
    assert set(o3.num_scheduled_tokens) == set(o1.num_scheduled_tokens)
    s.update(o2, r2)
    s.update(o3, w.execute(o3))
    drive(s, w, depth=2)
    for seq in seqs:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 6)
    assert s.max_in_flight_seen == 2


def test_all_running_in_flight_returns_none():
    s = make_sched(max_in_flight=4)
    s.add(make_seq(range(5)))
    assert s.schedule() is not None
    assert s.schedule() is None                           # the only sequence is in flight


@pytest.mark.parametrize("depth,num_seqs,sizes", [(2, 8, [4, 4]), (2, 5, [3, 2]), (3, 7, [3, 3, 1]), (1, 6, [6])])
def test_in_flight_batches_share_the_sequences(depth, num_seqs, sizes):
    """When one batch's budget fits every sequence, each of the depth in-flight batches still gets its share."""
    s = make_sched(max_num_seqs=8, budget=256, max_in_flight=depth)
    seqs = [make_seq(range(10 * i, 10 * i + 4), SamplingParams(max_tokens=5)) for i in range(num_seqs)]
    for seq in seqs:
        s.add(seq)
    outs = [s.schedule() for _ in sizes]
    assert [len(o.num_scheduled_tokens) for o in outs] == sizes
    assert s.schedule() is None
    w = FakeWorker(s)
    for o, r in [(o, w.execute(o)) for o in outs]:
        s.update(o, r)
    again = s.schedule()
    assert len(again.num_scheduled_tokens) == sizes[0]    # the first batch's sequences come back together
    s.update(again, w.execute(again))
    drive(s, w, depth=depth)
    for seq in seqs:
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 5)


# ---- deltas -----------------------------------------------------------------------------------------
def test_deltas_new_then_cached():
    s = make_sched(block_size=4)
    seq = make_seq(range(6), SamplingParams(max_tokens=5))
    s.add(seq)
    w = FakeWorker(s)
    out = s.schedule()
    assert [n.req_id for n in out.new_requests] == [seq.seq_id] and not out.cached_requests
    new = out.new_requests[0]
    assert new.prompt_token_ids == list(range(6)) and new.output_token_ids == [] and new.block_ids == seq.block_ids
    assert new.seed == seq.seed and new.sampling_params is seq.sampling_params and new.num_computed_tokens == 0
    s.update(out, w.execute(out))
    for i in range(1, 5):
        out = s.schedule()
        assert not out.new_requests
        (c,) = out.cached_requests
        assert c.new_token_ids == [seq.output_token_ids[-1]] and c.num_computed_tokens == 5 + i
        # 6 + i tokens need a 3rd block exactly when the 9th token arrives
        assert c.new_block_ids == ([seq.block_ids[2]] if 6 + i == 9 else [])
        s.update(out, w.execute(out))


# ---- abort and finish -------------------------------------------------------------------------------
def test_abort_waiting():
    s = make_sched()
    seq = make_seq(range(5))
    s.add(seq)
    assert s.abort(seq.seq_id) is seq
    assert seq.status == SequenceStatus.FINISHED_ABORTED and seq.finish_reason == "abort"
    assert not s.has_unfinished() and s.num_waiting == 0 and s.schedule() is None
    assert s.abort(seq.seq_id) is None and s.abort("nope") is None


def test_abort_running():
    s = make_sched()
    a, b = make_seq(range(5)), make_seq(range(10, 15))
    s.add(a)
    s.add(b)
    w = FakeWorker(s)
    out = s.schedule()
    s.update(out, w.execute(out))
    s.abort(a.seq_id)
    assert a.block_ids == [] and s.num_running == 1
    out = s.schedule()
    assert out.finished_req_ids == [a.seq_id] and list(out.num_scheduled_tokens) == [b.seq_id]
    s.update(out, w.execute(out))
    out = s.schedule()
    assert out.finished_req_ids == []                      # reported once
    s.update(out, w.execute(out))


def test_abort_in_flight_frees_at_update():
    s = make_sched()
    seq = make_seq(range(5))
    s.add(seq)
    w = FakeWorker(s)
    out = s.schedule()
    r = w.execute(out)
    s.abort(seq.seq_id)
    assert seq.is_finished and seq.block_ids and s.block_manager.usage > 0   # the step still uses them
    assert not s.has_unfinished()
    assert s.update(out, r) == []                          # its sampled token is dropped
    assert seq.output_token_ids == [] and seq.block_ids == [] and s.block_manager.usage == 0.0
    assert seq.status == SequenceStatus.FINISHED_ABORTED


def test_engine_finish_stop_string():
    s = make_sched()
    a, b = make_seq(range(5)), make_seq(range(10, 15))
    s.add(a)
    s.add(b)
    w = FakeWorker(s)
    out = s.schedule()
    s.update(out, w.execute(out))
    s.finish(a.seq_id, SequenceStatus.FINISHED_STOPPED, "stop", stop_reason="###")
    assert a.finish_reason == "stop" and a.stop_reason == "###" and a.block_ids == []
    out = s.schedule()
    assert a.seq_id in out.finished_req_ids and a.seq_id not in out.num_scheduled_tokens


# ---- stop conditions --------------------------------------------------------------------------------
PROMPT = [3, 1]
REF = reference(PROMPT, 20)


def _run_one(params: SamplingParams, eos=(), max_model_len=256, prompt=PROMPT) -> Sequence:
    s = make_sched(eos=eos, max_model_len=max_model_len)
    seq = make_seq(prompt, params)
    s.add(seq)
    drive(s)
    assert s.block_manager.usage == 0.0
    return seq


def test_eos_stops():
    seq = _run_one(SamplingParams(max_tokens=20), eos=(REF[2],))
    assert seq.output_token_ids == REF[:3]
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.finish_reason == "stop" and seq.stop_reason is None


def test_ignore_eos():
    seq = _run_one(SamplingParams(max_tokens=6, ignore_eos=True), eos=(REF[2],))
    assert seq.output_token_ids == REF[:6] and seq.finish_reason == "length"


def test_min_tokens_delays_eos():
    seq = _run_one(SamplingParams(max_tokens=6, min_tokens=4), eos=(REF[2],))
    assert seq.output_token_ids == REF[:6] and seq.finish_reason == "length"
    seq = _run_one(SamplingParams(max_tokens=6, min_tokens=3), eos=(REF[2],))
    assert seq.output_token_ids == REF[:3] and seq.finish_reason == "stop"


def test_stop_token_ids():
    seq = _run_one(SamplingParams(max_tokens=20, stop_token_ids=[REF[1]]))
    assert seq.output_token_ids == REF[:2]
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.stop_reason == REF[1]


def test_max_tokens_and_max_model_len():
    seq = _run_one(SamplingParams(max_tokens=4))
    assert seq.output_token_ids == REF[:4] and seq.status == SequenceStatus.FINISHED_LENGTH
    seq = _run_one(SamplingParams(max_tokens=None), max_model_len=9)
    assert seq.num_tokens == 9 and seq.output_token_ids == REF[:7] and seq.finish_reason == "length"


def test_finished_ids_reported_once():
    s = make_sched()
    short, long_ = make_seq(range(4), SamplingParams(max_tokens=1)), make_seq(range(9), SamplingParams(max_tokens=5))
    s.add(short)
    s.add(long_)
    w = drive(s)
    reports = [o.finished_req_ids for o in w.outputs]
    assert reports[1] == [short.seq_id]
    assert sum(r.count(short.seq_id) for r in reports) == 1


# ---- randomized -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "abort", "step", "step", "step"]),
                              st.integers(0, 10**6)), min_size=1, max_size=60),
       num_blocks=st.integers(10, 40), block_size=st.sampled_from([2, 4, 8]), budget=st.integers(1, 40),
       max_num_seqs=st.integers(1, 5), depth=st.integers(1, 3), prefix=st.booleans())
# Found by CI: two 21-token sequences in a 30-slot cache with two batches in flight used to preempt each other
# forever (the older one gave itself up while the younger was in flight, then took the younger's blocks back).
@example(ops=[("add", 609778), ("add", 118755), ("step", 0), ("step", 0), ("step", 0), ("step", 0), ("add", 530703),
              ("step", 0), ("add", 646617), ("step", 0), ("step", 0), ("add", 574850), ("step", 0), ("step", 0),
              ("step", 0), ("abort", 385380), ("abort", 945395), ("step", 0), ("step", 0), ("step", 0),
              ("abort", 34150), ("add", 331958), ("abort", 553532), ("add", 571953), ("step", 0), ("add", 243147),
              ("add", 679703), ("step", 0), ("step", 0), ("step", 0), ("add", 947968)],
         num_blocks=15, block_size=2, budget=5, max_num_seqs=3, depth=2, prefix=False)
def test_random_operations_keep_invariants(ops, num_blocks, block_size, budget, max_num_seqs, depth, prefix):
    max_model_len = min(40, num_blocks * block_size)
    s = make_sched(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, budget=budget,
                   max_model_len=max_model_len, max_in_flight=depth, prefix=prefix)
    w = FakeWorker(s)
    in_flight: deque = deque()
    seqs: list[Sequence] = []

    def step() -> None:
        out = s.schedule()
        if out is not None:
            in_flight.append((out, w.execute(out)))
        if in_flight and (out is None or len(in_flight) >= depth):
            s.update(*in_flight.popleft())

    for op, x in ops:
        if op == "add":
            prompt = [x % 3] * (x % 5) + [(x // 7 + j) % 11 for j in range(1 + x % 17)]   # shared prefixes
            seq = make_seq(prompt[:max_model_len - 1], SamplingParams(max_tokens=1 + x % 9))
            seqs.append(seq)
            s.add(seq)
        elif op == "abort" and seqs:
            s.abort(seqs[x % len(seqs)].seq_id)
        else:
            step()
        check_blocks(s)
        assert s.num_in_flight_batches == len(in_flight) <= depth
    for _ in range(5000):
        if not s.has_unfinished() and not in_flight:
            break
        step()
        check_blocks(s)
    assert not s.has_unfinished() and not in_flight
    assert s.block_manager.num_free_blocks == num_blocks and s.block_manager.usage == 0.0
    for seq in seqs:
        assert seq.is_finished and seq.block_ids == []
        n = seq.num_output_tokens
        assert seq.output_token_ids == reference(seq.prompt_token_ids, n)
        if seq.finish_reason == "length":
            assert n == seq.sampling_params.max_tokens or seq.num_tokens == max_model_len


# ---- KV content through the block tables --------------------------------------------------------------
class KVWorker:
    """A worker with a fake KV cache (one token id per slot) whose 'model' reads its whole context back through
    the block table: a block shared, reused or evicted wrongly changes the generated tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.reqs: dict[str, dict] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids:
            del self.reqs[req_id]
        for new in out.new_requests:
            self.reqs[new.req_id] = {"tokens": new.prompt_token_ids + new.output_token_ids,
                                     "blocks": list(new.block_ids), "computed": new.num_computed_tokens}
        for cached in out.cached_requests:
            r = self.reqs[cached.req_id]
            r["tokens"] += cached.new_token_ids
            r["blocks"] += cached.new_block_ids
            assert r["computed"] == cached.num_computed_tokens
        sampled = {}
        for req_id, n in out.num_scheduled_tokens.items():
            r = self.reqs[req_id]
            tokens, blocks, start = r["tokens"], r["blocks"], r["computed"]
            for pos in range(start, start + n):
                self.kv[blocks[pos // self.bs]][pos % self.bs] = tokens[pos]
            r["computed"] = start + n
            if start + n == len(tokens):
                sampled[req_id] = context_model([self.kv[blocks[p // self.bs]][p % self.bs] for p in range(start + n)])
        return ModelRunnerOutput(out.step_id, sampled)


def context_model(context: list[int | None]) -> int:
    h = 0
    for t in context:
        h = (h * 31 + (-5 if t is None else t) + 7) % 1_000_003
    return h % 1000


def context_reference(prompt: list[int], n: int) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(context_model(tokens))
        tokens.append(out[-1])
    return out


@pytest.mark.parametrize("depth,num_blocks", [(1, 256), (2, 256), (1, 12), (2, 14), (3, 16)])
def test_kv_content_survives_preemption_prefix_reuse_and_pipelining(depth, num_blocks):
    shared = list(range(8))                                # a common prefix: blocks shared via their hash
    prompts = [shared + [40 + i] * (1 + 2 * i) for i in range(5)] + [list(range(50 + i, 58 + i)) for i in range(3)]
    s = make_sched(num_blocks=num_blocks, block_size=4, budget=16, max_model_len=64, max_in_flight=depth)
    seqs = [make_seq(p, SamplingParams(max_tokens=10 + i)) for i, p in enumerate(prompts)]
    for seq in seqs:
        s.add(seq)
    drive(s, KVWorker(num_blocks, 4), depth=depth)
    for seq in seqs:
        assert seq.output_token_ids == context_reference(seq.prompt_token_ids, seq.sampling_params.max_tokens)
    assert s.block_manager.num_free_blocks == num_blocks and s.max_in_flight_seen == depth
    if num_blocks <= 16:
        assert s.num_preemptions_total > 0
    else:
        assert s.prefix_cache_hit_tokens > 0
