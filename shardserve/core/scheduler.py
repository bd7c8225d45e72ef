"""Scheduler: continuous batching, chunked prefill, recompute preemption, up to max_in_flight batches in flight."""
from __future__ import annotations

from collections import deque

from shardserve.core.block_manager import BlockManager
from shardserve.core.outputs import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from shardserve.core.sequence import Sequence, SequenceStatus


class Scheduler:
    """Invariants: every live sequence is in exactly one of `waiting` (FCFS) or `running`; a sequence in flight
    is never scheduled again until its step's update arrives; a finished sequence's blocks are freed at once, or
    at its step's update when it finished while in flight (`_pending`)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_in_flight: int = 1, eos_token_ids: tuple[int, ...] = ()) -> None:
        assert max_num_seqs > 0 and max_num_batched_tokens > 0 and max_in_flight > 0
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_in_flight = max_in_flight
        self.eos_token_ids = tuple(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []                 # admission order
        self.seqs: dict[str, Sequence] = {}               # live sequences, by seq_id
        self._pending: dict[str, Sequence] = {}           # finished while in flight: freed at their update
        self._order: dict[str, int] = {}                  # arrival tie-break (add order)
        self._num_added = 0
        self._finished_ids: list[str] = []                # for the next SchedulerOutput.finished_req_ids
        self._in_flight_steps: deque[int] = deque()       # step ids scheduled but not yet updated, in order
        self._next_step_id = 0
        # stats
        self.max_in_flight_seen = 0
        self.num_preemptions_total = 0
        self.prefix_cache_hit_tokens = 0

    # ---- queue ---------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        assert seq.seq_id not in self.seqs, f"duplicate seq_id {seq.seq_id!r}"
        assert seq.status == SequenceStatus.WAITING
        # Prompt validation is the engine's job; a sequence that cannot fit the whole cache would never run.
        assert self.block_manager.blocks_needed(seq.num_tokens) <= self.block_manager.num_blocks, \
            f"{seq.seq_id}: {seq.num_tokens} tokens do not fit in {self.block_manager.num_blocks} KV blocks"
        self.seqs[seq.seq_id] = seq
        self._order[seq.seq_id] = self._num_added
        self._num_added += 1
        self.waiting.append(seq)

    def get(self, seq_id: str) -> Sequence | None:
        return self.seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_in_flight_batches(self) -> int:
        return len(self._in_flight_steps)

    def abort(self, seq_id: str) -> Sequence | None:
        seq = self.seqs.get(seq_id)
        if seq is None:
            return None
        self._finish(seq, SequenceStatus.FINISHED_ABORTED, "abort")
        return seq

    def finish(self, seq_id: str, status: SequenceStatus, reason: str, stop_reason: int | str | None = None,
               error: str | None = None) -> Sequence | None:
        """For the engine (stop strings, errors). Frees blocks, deferred to the step's update if in flight."""
        seq = self.seqs.get(seq_id)
        if seq is not None:
            if error is not None:
                seq.error = error
            self._finish(seq, status, reason, stop_reason)
        return seq

    def _finish(self, seq: Sequence, status: SequenceStatus, reason: str, stop_reason: int | str | None = None
                ) -> None:
        seq.finish(status, reason, stop_reason)
        del self.seqs[seq.seq_id]
        self._order.pop(seq.seq_id, None)
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.in_flight:
            self._pending[seq.seq_id] = seq              # its step still uses the blocks
        else:
            self.block_manager.free(seq)
        if seq.num_tokens_sent:                          # only tell workers about sequences they know
            self._finished_ids.append(seq.seq_id)

    # ---- schedule ------------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        """Recompute-preemption: drop its KV and send it to the front of the waiting queue."""
        assert not seq.in_flight
        self.running.remove(seq)
        self.block_manager.free(seq)
        if seq.num_tokens_sent:
            self._finished_ids.append(seq.seq_id)        # workers drop it; it comes back as NewRequestData
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_tokens_sent = seq.num_blocks_sent = 0
        seq.needs_full_send = True
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(seq)

    def _age_key(self, seq: Sequence) -> tuple[float, int]:
        """Larger = arrived later (ties: added later); the preemption victim is the largest."""
        return seq.arrival_time, self._order[seq.seq_id]

    def schedule(self) -> SchedulerOutput | None:
        """Build the next batch, or None when nothing can be scheduled now."""
        if len(self._in_flight_steps) >= self.max_in_flight:
            return None
        budget = self.max_num_batched_tokens
        # With P batches in flight, a batch takes at most its share of the live sequences, ceil(live / P), so
        # the pipeline's P batches all carry work even when one batch's budget would fit every sequence.
        cap = min(self.max_num_seqs, -(-len(self.seqs) // self.max_in_flight))
        scheduled: dict[str, int] = {}                   # seq_id -> tokens, in batch order
        batch: list[Sequence] = []
        blocks_short = False                             # a running sequence lacked blocks: admit no new one

        # 1. running sequences that are not in flight: one decode token or the next prompt chunk.
        for seq in list(self.running):
            if budget == 0 or len(batch) >= cap:
                break
            if seq.in_flight or seq.status != SequenceStatus.RUNNING:
                continue                                 # in flight, or preempted earlier in this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, seq
            while not self.block_manager.allocate(seq, num_new):
                # Victim: the most recently arrived running sequence not in flight and not yet scheduled.
                victim = max((s for s in self.running if not s.in_flight and s.seq_id not in scheduled),
                             key=self._age_key)
                if victim is seq and any(s.in_flight and self._age_key(s) > self._age_key(seq) for s in self.running):
                    # A younger sequence holds blocks in flight: wait for its batch to return (it becomes the
                    # victim then) rather than give up this one's progress. Preempting the older sequence here
                    # let two sequences preempt each other forever whenever the cache fits only one of them.
                    blocks_short = True
                    break
                self._preempt(victim)
                blocks_short = True
                if victim is seq:
                    break
            else:
                scheduled[seq.seq_id] = num_new
                batch.append(seq)
                budget -= num_new

        # 2. waiting sequences, FCFS, while budget, the sequence caps and blocks allow (none once a running
        # sequence lacked blocks: it preempted, or it waits for an in-flight batch).
        # `cap` (<= max_num_seqs) limits one batch; with P batches in flight up to P * max_num_seqs sequences run.
        while (self.waiting and budget > 0 and not blocks_short and len(batch) < cap
               and len(self.running) < self.max_num_seqs * self.max_in_flight):
            seq = self.waiting[0]
            _, hit = self.block_manager.prefix_hit(seq)
            num_new = min(seq.num_tokens - hit, budget)
            if not self.block_manager.allocate(seq, num_new):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                self.prefix_cache_hit_tokens += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = num_new
            batch.append(seq)
            budget -= num_new

        if not batch:
            return None
        # A preempted sequence scheduled again in this same output gets full data, which replaces worker state.
        out = SchedulerOutput(step_id=self._next_step_id, num_scheduled_tokens=scheduled,
                              finished_req_ids=[i for i in self._finished_ids if i not in scheduled])
        self._finished_ids = []
        self._next_step_id += 1
        for seq in batch:
            if seq.needs_full_send:
                out.new_requests.append(NewRequestData(
                    req_id=seq.seq_id, prompt_token_ids=list(seq.prompt_token_ids),
                    output_token_ids=list(seq.output_token_ids), sampling_params=seq.sampling_params,
                    seed=seq.seed, block_ids=list(seq.block_ids), num_computed_tokens=seq.num_computed_tokens,
                    want_prompt_logprobs=seq.needs_prompt_logits))
                seq.needs_full_send = False
            else:
                out.cached_requests.append(CachedRequestData(
                    req_id=seq.seq_id, new_token_ids=seq.token_ids_slice(seq.num_tokens_sent),
                    new_block_ids=seq.block_ids[seq.num_blocks_sent:], num_computed_tokens=seq.num_computed_tokens))
            seq.num_tokens_sent = seq.num_tokens
            seq.num_blocks_sent = len(seq.block_ids)
            seq.in_flight_step = out.step_id
        self._in_flight_steps.append(out.step_id)
        self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._in_flight_steps))
        return out

    # ---- update --------------------------------------------------------------------------------------
    def update(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Sequence]:
        """Apply one step's results (in step order). Returns the sequences that received a token."""
        assert self._in_flight_steps and self._in_flight_steps[0] == sched_out.step_id == runner_out.step_id, \
            f"updates must arrive in step order: expected {list(self._in_flight_steps)[:1]}, got {sched_out.step_id}"
        self._in_flight_steps.popleft()
        updated: list[Sequence] = []
        for seq_id, num in sched_out.num_scheduled_tokens.items():
            pending = self._pending.pop(seq_id, None)
            if pending is not None:                      # finished/aborted while in flight: free now
                pending.in_flight_step = pending.pp_stage = None
                self.block_manager.free(pending)
                continue
            seq = self.seqs[seq_id]
            assert seq.in_flight_step == sched_out.step_id
            seq.in_flight_step = seq.pp_stage = None
            seq.num_computed_tokens += num
            self.block_manager.mark_computed(seq)
            token = runner_out.sampled_token_ids.get(seq_id)
            if token is None:
                continue
            assert seq.num_computed_tokens == seq.num_tokens, "a token is sampled only at the end of known tokens"
            seq.append_token(token)
            updated.append(seq)
            self._check_stop(seq, token)
        return updated

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, SequenceStatus.FINISHED_STOPPED, "stop")
            if token in params.stop_token_ids:
                return self._finish(seq, SequenceStatus.FINISHED_STOPPED, "stop", stop_reason=token)
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            self._finish(seq, SequenceStatus.FINISHED_LENGTH, "length")
