"""LLMEngine: the driver loop. Each step is schedule -> executor.execute_model -> scheduler.update.

With pipeline parallelism up to pp batches are in flight: a step submits a new batch and only waits
for the oldest one when the pipeline is full (or nothing new can be scheduled).
"""
from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass

from shardserve.config import EngineConfig
from shardserve.core.block_manager import BlockManager
from shardserve.core.outputs import CompletionOutput, Logprob, ModelRunnerOutput, RequestOutput
from shardserve.core.scheduler import Scheduler
from shardserve.core.sequence import Sequence, SequenceStatus
from shardserve.executor.create_executor import create_executor
from shardserve.model.tokenizer import IncrementalDetokenizer, load_tokenizer
from shardserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PromptType = str | list[int] | dict


def _cache_rule(config: EngineConfig) -> str:
    """Why the KV cache has the size it has, for the start-up line."""
    cache = config.cache
    if cache.kv_cache_memory is not None:
        return "kv_cache_memory, zeroed up front"
    if config.parallel.device != "cpu":
        return f"{cache.memory_fraction:.0%} of free device memory after the weights"
    return (f"the CPU default: at most {cache.cpu_memory_fraction:.0%} of available RAM and "
            f"{cache.cpu_kv_cache_cap >> 30} GiB per node, and what max_num_seqs x max_model_len can use; "
            f"pages fault in as they are used")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    texts: list[str]
    logprobs: list[list[dict[int, Logprob]] | None]
    cumulative: list[float | None]
    arrival_time: float
    first_token_time: float | None = None
    error: str | None = None
    stop_buffer: int = 0                     # chars held back while a stop string may still be forming
    # per prompt token: None (the first; and any not yet computed) or the prompt token plus top-k; None if not asked
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or load_tokenizer(config.model.spec)
        self.executor = create_executor(config)
        try:
            num_blocks = self.executor.start()
            sched_cfg, cache_cfg = config.scheduler, config.cache
            self.block_manager = BlockManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching)
            if self.block_manager.blocks_needed(sched_cfg.max_model_len) > num_blocks:
                raise ValueError(
                    f"the KV cache holds {num_blocks * cache_cfg.block_size} tokens per rank, fewer than "
                    f"max_model_len={sched_cfg.max_model_len}; lower max_model_len or raise kv_cache_memory")
        except BaseException:
            self.executor.shutdown()
            raise
        log.info("KV cache: %d tokens per rank in %.0f MiB (%s); --kv-cache-memory (bytes per rank) sets it",
                 num_blocks * cache_cfg.block_size, self.executor.kv_cache_bytes / (1 << 20), _cache_rule(config))
        self.scheduler = Scheduler(self.block_manager, sched_cfg.max_num_seqs, sched_cfg.max_num_batched_tokens,
                                   sched_cfg.max_model_len, self.executor.max_concurrent_batches,
                                   eos_token_ids=config.model.spec.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.in_flight: deque = deque()      # (SchedulerOutput, future, its Sequences), oldest first
        self.rng = random.Random(config.model.seed)
        self.num_steps = 0
        self.dead: Exception | None = None

    @classmethod
    def from_engine_args(cls, args) -> "LLMEngine":
        return cls(args.create_config())

    # ---- requests -----------------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            try:
                return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
            except (TypeError, UnicodeError) as exc:     # e.g. lone surrogates from undecodable bytes
                raise ValueError(f"the prompt is not valid Unicode text ({exc}); decode its bytes first") from exc
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def validate_prompt(self, token_ids: list[int]) -> None:
        vocab, max_len = self.config.model.spec.vocab_size, self.config.scheduler.max_model_len
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}) (the model's vocab)")
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but max_model_len is {max_len} (prompt plus "
                             f"at least one generated token); shorten the prompt or raise max_model_len")

    def validate_params(self, params: SamplingParams) -> None:
        """Checks of SamplingParams against the model (SamplingParams checks itself on construction)."""
        vocab = self.config.model.spec.vocab_size
        if params.logit_bias:
            bad = sorted(t for t in params.logit_bias if t >= vocab)
            if bad:
                raise ValueError(f"logit_bias token ids must be in [0, {vocab}) (the model's vocab), got {bad[:5]}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError (and queues nothing) when the prompt cannot be served."""
        self._raise_if_dead()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, token_ids = self.tokenize(prompt)
        self.validate_prompt(token_ids)
        self.validate_params(params)
        arrival = arrival_time or time.time()
        base_seed = params.seed if params.seed is not None else self.rng.randrange(2**62)
        seqs = [Sequence(seq_id=f"{request_id}-{i}", request_id=request_id, index=i,
                         prompt_token_ids=list(token_ids), sampling_params=params, seed=base_seed + i,
                         arrival_time=arrival) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) for _ in seqs]
        want_lp = params.logprobs is not None
        req = _Request(request_id, text, list(token_ids), params, seqs, detoks, [""] * params.n,
                       [[] if want_lp else None for _ in seqs], [0.0 if want_lp else None for _ in seqs], arrival,
                       stop_buffer=max((len(s) for s in params.stop), default=1) - 1,
                       prompt_logprobs=None if params.prompt_logprobs is None else [None] * len(token_ids))
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)

    def fail_request(self, request_id: str, prompt: PromptType, error: str) -> RequestOutput:
        """An output for a request that was refused at the door (the engine serves the others)."""
        text = prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
        ids = prompt.get("prompt_token_ids", []) if isinstance(prompt, dict) else (
            list(prompt) if isinstance(prompt, (list, tuple)) else [])
        return RequestOutput(request_id, text, ids, [CompletionOutput(0, "", [], None, None, "error")], True, error)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self.in_flight)

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and submit a batch; once the pipeline is full, finish the oldest one and report."""
        self._raise_if_dead()
        sched = self.scheduler.schedule()
        if sched is not None:
            seqs = [self.scheduler.seqs[seq_id] for seq_id in sched.num_scheduled_tokens]
            self.in_flight.append((sched, self.executor.execute_model(sched), seqs))
            self._advance_pp_stages()
        if not self.in_flight or (sched is not None and len(self.in_flight) < self.executor.max_concurrent_batches):
            return []
        sched, future, step_seqs = self.in_flight.popleft()
        try:
            runner_out: ModelRunnerOutput = future.result()
        except Exception as exc:
            self._die(exc)
            raise
        self.num_steps += 1
        updated = self.scheduler.update(sched, runner_out)
        if runner_out.prompt_logprobs:
            self._process_prompt_logprobs(step_seqs, runner_out)
        touched = self._process(updated, runner_out)
        return [self._make_output(req) for req in touched]

    def _advance_pp_stages(self) -> None:
        """Set Sequence.pp_stage after a submission: the driver's model of a FIFO pipeline, not a measurement.

        Stages take batches in FIFO order. The model: each submission enters stage 0 and moves every earlier
        batch one stage on; a batch at the last stage stays queued there until its tokens come back. So of the
        k batches in flight, the one submitted j submissions ago (j newer batches are still in flight) is at
        stage min(j, P - 1). The ranks may really be behind or ahead of this; the driver does not ask them.
        scheduler.update resets pp_stage to None when the step's tokens come back. Costs one pass over the
        sequences of the in-flight batches (at most P batches), nothing over the other sequences.
        """
        last_stage = self.executor.max_concurrent_batches - 1
        for j, (_, _, seqs) in enumerate(reversed(self.in_flight)):
            for seq in seqs:
                seq.pp_stage = min(j, last_stage)

    def _process(self, seqs: list[Sequence], runner_out: ModelRunnerOutput) -> list[_Request]:
        touched: dict[str, _Request] = {}
        now = time.time()
        for seq in seqs:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            i, token = seq.index, seq.output_token_ids[-1]
            req.first_token_time = req.first_token_time or now
            delta = req.detoks[i].append(token)
            req.texts[i] += delta
            if req.logprobs[i] is not None and seq.seq_id in runner_out.logprobs:
                lp, top = runner_out.logprobs[seq.seq_id]
                entry = {t: Logprob(v, rank=r + 1) for r, (t, v) in enumerate(top)}
                entry.setdefault(token, Logprob(lp))
                req.logprobs[i].append(entry)
                req.cumulative[i] += lp
            if req.params.stop and seq.finish_reason in (None, "length"):
                self._check_stop_strings(req, seq, len(delta))
            touched[req.request_id] = req
        return list(touched.values())

    def _process_prompt_logprobs(self, seqs: list[Sequence], runner_out: ModelRunnerOutput) -> None:
        """Store the prompt logprobs a step computed, by prompt position (a recomputed position overwrites)."""
        for seq in seqs:
            got = runner_out.prompt_logprobs.get(seq.seq_id)
            req = self.requests.get(seq.request_id)
            if got is None or req is None or req.prompt_logprobs is None:
                continue
            ids = req.prompt_token_ids
            for i, (lp, rank, top) in enumerate(zip(got.token_logprobs, got.ranks, got.top)):
                pos = got.start + i
                token = ids[pos]
                # vLLM's order: the prompt token first, then the top-k by rank
                entry = {token: Logprob(lp, rank=rank, decoded_token=self._decode_one(token))}
                for r, (t, v) in enumerate(top):
                    entry.setdefault(t, Logprob(v, rank=r + 1, decoded_token=self._decode_one(t)))
                req.prompt_logprobs[pos] = entry

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _check_stop_strings(self, req: _Request, seq: Sequence, delta_len: int) -> None:
        text, i = req.texts[seq.index], seq.index
        window = delta_len + req.stop_buffer + 1
        for stop in req.params.stop:
            at = text.find(stop, max(0, len(text) - window - len(stop)))
            if at >= 0:
                end = at + len(stop) if req.params.include_stop_str_in_output else at
                req.texts[i] = text[:end]
                if seq.is_finished:             # the same token also hit max_tokens: the stop string wins
                    seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, "stop", stop
                else:
                    self.scheduler.finish(seq.seq_id, SequenceStatus.FINISHED_STOPPED, "stop", stop_reason=stop)
                return

    def _make_output(self, req: _Request) -> RequestOutput:
        finished = req.finished
        outs = []
        for i, seq in enumerate(req.seqs):
            text = req.texts[i]
            if not seq.is_finished and req.params.stop and req.stop_buffer:
                text = text[: max(0, len(text) - req.stop_buffer)]      # a stop string may still be forming
            outs.append(CompletionOutput(i, text, list(seq.output_token_ids), req.cumulative[i],
                                         req.logprobs[i], seq.finish_reason, seq.stop_reason))
        metrics = {"arrival_time": req.arrival_time, "first_token_time": req.first_token_time}
        if finished:
            metrics["finished_time"] = time.time()
            self.requests.pop(req.request_id, None)
        prompt_logprobs = None if req.prompt_logprobs is None else list(req.prompt_logprobs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, req.error,
                             max(s.num_cached_prompt_tokens for s in req.seqs), metrics, prompt_logprobs)

    # ---- failure and shutdown -----------------------------------------------------------------------
    def _die(self, exc: Exception) -> None:
        self.dead = exc
        for req in self.requests.values():
            req.error = str(exc)
        for _, _, seqs in self.in_flight:
            for seq in seqs:
                seq.pp_stage = None
        self.in_flight.clear()

    def _raise_if_dead(self) -> None:
        if self.dead is not None:
            raise RuntimeError(f"the engine is stopped because a worker failed: {self.dead}")

    def stats(self) -> dict:
        s = self.scheduler
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "kv_cache_usage": self.block_manager.usage,
                "num_in_flight_batches": s.num_in_flight_batches, "max_in_flight_seen": s.max_in_flight_seen,
                "num_preemptions": s.num_preemptions_total, "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
                "num_steps": self.num_steps, "num_blocks": self.block_manager.num_blocks}

    def shutdown(self) -> None:
        self.executor.shutdown()
