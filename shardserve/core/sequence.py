"""Sequence: the driver-side state of one generated continuation (pure Python, no torch)."""
from __future__ import annotations

import enum
import time

from shardserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Life cycle of a sequence:

        WAITING --schedule--> RUNNING --update (eos/stop/length)--> FINISHED_STOPPED | FINISHED_LENGTH
           ^                     |
           +----- preempted -----+            (any state) --abort/error--> FINISHED_ABORTED | FINISHED_ERROR

    A preempted sequence loses its KV blocks (recompute): it goes back to the front of the waiting
    queue with num_computed_tokens = 0 and is sent to the workers in full when scheduled again.
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The vLLM-style finish reason string for a finished status ("stop" | "length" | "abort" | "error")."""
        return _FINISH_REASON.get(self)


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                       SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR})
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                  SequenceStatus.FINISHED_ABORTED: "abort", SequenceStatus.FINISHED_ERROR: "error"}


class Sequence:
    """One generated continuation; a request with n > 1 owns n Sequences ("req7-0", "req7-1", ...).

    Invariants: 0 <= num_computed_tokens <= num_tokens; block_ids covers at least num_computed_tokens
    tokens while RUNNING and is empty while WAITING or FINISHED (once no step holding it is in flight);
    num_tokens_sent <= num_tokens; num_blocks_sent <= len(block_ids) (after a preemption both are 0).
    """

    def __init__(self, seq_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams | None = None,
                 *, request_id: str | None = None, index: int = 0, seed: int = 0,
                 arrival_time: float | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError(f"Sequence {seq_id!r}: prompt_token_ids must not be empty")
        self.seq_id: str = seq_id
        self.request_id: str = request_id if request_id is not None else seq_id
        self.index: int = index
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params: SamplingParams = sampling_params if sampling_params is not None else SamplingParams()
        self.seed: int = seed
        self.arrival_time: float = arrival_time if arrival_time is not None else time.monotonic()
        self.status: SequenceStatus = SequenceStatus.WAITING
        # KV cache state (owned by the BlockManager / Scheduler).
        self.block_ids: list[int] = []
        self.num_computed_tokens: int = 0       # tokens whose KV is in the cache
        self.num_cached_prompt_tokens: int = 0  # prefix-cache hit size at the last admission (stats)
        # What the workers already know: drives the per-step deltas.
        self.num_tokens_sent: int = 0
        self.num_blocks_sent: int = 0
        self.needs_full_send: bool = True       # new or preempted: the next schedule sends NewRequestData
        # Pipeline parallelism: the step id of the batch it is in flight in (never scheduled twice at once).
        self.in_flight_step: int | None = None
        # The pipeline stage the engine has dispatched it up to, informational: a model of the FIFO pipeline,
        # not a measurement (of k batches in flight, the one submitted j submissions ago is at stage
        # min(j, P - 1); see LLMEngine._advance_pp_stages). None while not in flight.
        self.pp_stage: int | None = None
        # Outcome.
        self.finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.num_preemptions: int = 0

    # -- token views ---------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def needs_prompt_logits(self) -> bool:
        """True while this sequence must compute logits at every prompt position (prompt_logprobs asked, the
        request's first sequence, no output yet): it takes no prefix-cache hit, whose positions would give none."""
        return self.sampling_params.prompt_logprobs is not None and self.index == 0 and not self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids_slice(self, start: int, end: int | None = None) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        p = len(self.prompt_token_ids)
        end = self.num_tokens if end is None else min(end, self.num_tokens)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    # -- state ---------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def in_flight(self) -> bool:
        return self.in_flight_step is not None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, status: SequenceStatus, reason: str | None = None, stop_reason: int | str | None = None,
               error: str | None = None) -> None:
        """Mark finished; the first finish wins (a later abort does not overwrite a stop)."""
        if not status.is_finished:
            raise ValueError(f"Sequence.finish needs a FINISHED_* status, got {status}")
        if self.is_finished:
            return
        self.status = status
        self.finish_reason = reason if reason is not None else status.finish_reason
        self.stop_reason = stop_reason
        if error is not None:
            self.error = error

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.name}, tokens={self.num_prompt_tokens}+"
                f"{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={self.block_ids}, "
                f"in_flight={self.in_flight_step})")
