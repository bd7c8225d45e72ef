"""The process-boundary contract: what the driver sends each rank per step, and what comes back.

Plain dataclasses of ids and token lists only (pickled across local queues). A request is sent in full
the first time it is scheduled (or again after a preemption); after that only per-step deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str                      # one sequence (a request with n > 1 has n of them)
    prompt_token_ids: list[int]
    output_token_ids: list[int]      # non-empty only when resumed after preemption (recomputed as context)
    sampling_params: SamplingParams
    seed: int                        # effective seed for this sequence's sampling noise
    block_ids: list[int]             # its whole block table
    num_computed_tokens: int         # tokens whose KV is already in the cache (prefix-cache hit), block aligned
    # the last stage returns prompt logprobs for the prompt positions this sequence runs (needs
    # sampling_params.prompt_logprobs; set for the first sequence of a request, until it has outputs)
    want_prompt_logprobs: bool = False


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]         # tokens sampled for it since it was last scheduled (in order)
    new_block_ids: list[int]         # blocks appended to its table since then
    num_computed_tokens: int         # tokens already in the KV cache before this step


@dataclass
class SchedulerOutput:
    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # req_id -> number of tokens to run this step; dict order is the batch order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_req_ids: list[str] = field(default_factory=list)   # workers drop their state for these

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class ModelRunnerOutput:
    step_id: int
    # req_id -> sampled token, only for requests whose step reached the end of their known tokens.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # req_id -> (logprob of the sampled token, [(token_id, logprob)] top-k, descending); only if asked.
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    # req_id -> the prompt logprobs of the prompt positions its chunk covered this step; only if asked.
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens start .. start + N - 1 (start >= 1), each given the tokens before it."""
    start: int                                   # prompt position of the first entry
    token_logprobs: list[float]                  # [N] logprob of the prompt token itself
    ranks: list[int]                             # [N] its 1-based rank in the distribution
    top: list[list[tuple[int, float]]]          # [N][k] top-k (token, logprob), descending


# ---- what the user gets back (vLLM-compatible shapes) ------------------------------------------------
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None            # 1-based rank in the distribution, when known
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None   # per generated token: sampled token + top-k
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None        # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None                    # set when the request failed (finish_reason "error")
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)  # arrival_time, first_token_time, finished_time
    # per prompt token (None for the first): the prompt token plus the top-k; None unless asked
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
