"""ModelRunner: turns a SchedulerOutput into a forward pass over this rank's shard, and samples on the last stage.

It keeps a small state per request (tokens, block table, sampling settings), filled from the full data
the first time and from per-step deltas after. Every rank updates that state only from SchedulerOutputs,
so all stages agree on the tokens even though only the last stage samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shardserve.core.outputs import ModelRunnerOutput, PromptLogprobs, SchedulerOutput
from shardserve.model.forward_batch import ForwardBatch, SeqChunk, build_forward_batch
from shardserve.model.layers.attention import PagedAttention
from shardserve.model.layers.sampler import SampleRequest, argmax_suffices, sample, target_logprobs
from shardserve.sampling_params import SamplingParams

PROMPT_LOGITS_ROWS = 256      # prompt-logprob rows per LM-head call: [256, vocab] float32 logits at a time


@dataclass
class RequestState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int
    block_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # prompt + outputs, kept in step (no per-step concat)
    want_prompt_logprobs: bool = False                   # return logprobs of the prompt positions it runs

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids
        self.want_prompt_logprobs = self.want_prompt_logprobs and self.params.prompt_logprobs is not None

    def append_outputs(self, new_token_ids: list[int]) -> None:
        self.output_token_ids += new_token_ids
        self.token_ids += new_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device, dtype: torch.dtype,
                 eos_token_ids: tuple[int, ...]):
        self.model, self.block_size, self.device, self.dtype = model, block_size, device, dtype
        self.eos_token_ids = eos_token_ids
        self.attn_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        self.requests: dict[str, RequestState] = {}

    # ---- KV cache -------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attn_layers)
        return per_token * self.block_size * torch.finfo(self.dtype).bits // 8

    def init_cache(self, num_blocks: int, zero: bool = True) -> int:
        """One K and one V tensor per owned layer: [num_blocks * block_size, kv_heads_local, head_dim]; returns
        their bytes.

        zero: every page touched now, as vLLM does, rather than at first use, where faulting the cache in page by
        page cost ~2 s of a 37 s CPU benchmark run (BENCHMARKS.md). Otherwise only the first block is zeroed: slot 0
        pads decode batches and must hold finite values; every other slot is written before it is read.
        """
        slots = num_blocks * self.block_size
        for attn in self.attn_layers:
            k_cache, v_cache = (torch.empty(slots, attn.num_kv_heads, attn.head_dim, dtype=self.dtype,
                                            device=self.device) for _ in range(2))
            for cache in (k_cache, v_cache):
                (cache if zero else cache[:self.block_size]).zero_()
            attn.bind_cache(k_cache, v_cache)
        return num_blocks * self.kv_bytes_per_block()

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, intermediate: dict[str, torch.Tensor] | None,
                sample_here: bool) -> ModelRunnerOutput | dict[str, torch.Tensor]:
        """Runs this stage's layers. Returns the hand-off dict (not last stage) or sampled tokens."""
        computed = self._update_states(sched)
        batch, sample_ids, sample_rows, spans = self._prepare(sched, computed)
        out = self.model(batch, intermediate)
        if isinstance(out, dict):
            return out
        result = ModelRunnerOutput(step_id=sched.step_id)
        if not sample_ids and not spans:
            return result
        hidden = out[batch.logits_indices]                            # [L, hidden]: rows read this step
        if spans:
            self._prompt_logprobs(hidden, spans, sample_here, result)
        if not sample_ids:
            return result
        hidden = _take(hidden, sample_rows)                           # [S, hidden]
        states = [self.requests[i] for i in sample_ids]
        reqs = [SampleRequest(s.params, s.seed, s.prompt_token_ids, s.output_token_ids) for s in states]
        # Rows needing only the argmax skip the logits (LM head's greedy); the rest sample from full logits.
        # Every rank splits alike: the split depends only on the requests.
        argmax_only = [argmax_suffices(r) for r in reqs]
        argmax_rows = [i for i, only in enumerate(argmax_only) if only]
        other_rows = [i for i, only in enumerate(argmax_only) if not only]
        if argmax_rows:
            tokens = self.model.greedy_tokens(_take(hidden, argmax_rows))          # on tp_rank 0 only
            if sample_here and tokens is not None:
                result.sampled_token_ids.update(zip([sample_ids[i] for i in argmax_rows], tokens.tolist()))
        if other_rows:
            logits = self.model.compute_logits(_take(hidden, other_rows))          # on tp_rank 0 only
            if sample_here and logits is not None:
                sampled = sample(logits, [reqs[i] for i in other_rows], self.eos_token_ids)
                for i, token, lp in zip(other_rows, sampled.token_ids, sampled.logprobs):
                    result.sampled_token_ids[sample_ids[i]] = token
                    if lp is not None:
                        result.logprobs[sample_ids[i]] = lp
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, spans: list[PromptSpan], sample_here: bool,
                         result: ModelRunnerOutput) -> None:
        """hidden [L, hidden_size]: each span's rows give the float32 logprobs of the prompt tokens that follow
        them. At most PROMPT_LOGITS_ROWS rows of logits ([rows, vocab] float32) at a time; every TP rank makes
        the same compute_logits calls (the LM head gathers the vocab shards to tp_rank 0)."""
        for span in spans:
            n = len(span.targets)
            entry = PromptLogprobs(span.position, [], [], [])
            for a in range(0, n, PROMPT_LOGITS_ROWS):
                b = min(n, a + PROMPT_LOGITS_ROWS)
                logits = self.model.compute_logits(hidden[span.row + a: span.row + b])   # [b - a, V] on tp_rank 0
                if logits is None or not sample_here:
                    continue
                chosen, ranks, top = target_logprobs(logits, span.targets[a:b], span.k)
                entry.token_logprobs += chosen
                entry.ranks += ranks
                entry.top += top
            if sample_here and entry.token_logprobs:
                result.prompt_logprobs[span.req_id] = entry

    def _update_states(self, sched: SchedulerOutput) -> dict[str, int]:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        computed: dict[str, int] = {}
        for new in sched.new_requests:
            self.requests[new.req_id] = RequestState(list(new.prompt_token_ids), list(new.output_token_ids),
                                                     new.sampling_params, new.seed, list(new.block_ids),
                                                     want_prompt_logprobs=new.want_prompt_logprobs)
            computed[new.req_id] = new.num_computed_tokens
        for cached in sched.cached_requests:
            state = self.requests[cached.req_id]
            state.append_outputs(cached.new_token_ids)
            state.block_ids += cached.new_block_ids
            computed[cached.req_id] = cached.num_computed_tokens
        return computed

    def _prepare(self, sched: SchedulerOutput, computed: dict[str, int]
                 ) -> tuple[ForwardBatch, list[str], list[int], list[PromptSpan]]:
        """The batch, the sampled requests, their rows in out[logits_indices], and the prompt-logprob spans."""
        decode, prefill = [], []
        for req_id, n in sched.num_scheduled_tokens.items():
            state, start = self.requests[req_id], computed[req_id]
            end = start + n
            # Row p's logits give prompt token p + 1: rows [start, min(end, P - 1)); with them, every row of the
            # chunk is read (its last one is then either the next prompt position or the sampled one).
            all_logits = state.want_prompt_logprobs and start < len(state.prompt_token_ids) - 1
            chunk = SeqChunk(state.token_ids[start:end], start, state.block_ids, end == state.num_tokens,
                             all_logits)
            (decode if n == 1 and start > 0 else prefill).append((req_id, chunk))
        sample_ids, sample_rows, spans = [], [], []
        row = 0                                                      # next row of out[logits_indices]
        for req_id, c in decode + prefill:
            if c.all_logits:
                state = self.requests[req_id]
                stop = min(c.start + len(c.token_ids), len(state.prompt_token_ids) - 1)
                spans.append(PromptSpan(req_id, row, c.start + 1, state.prompt_token_ids[c.start + 1: stop + 1],
                                        state.params.prompt_logprobs))
                row += len(c.token_ids)
                if c.sample:
                    sample_ids.append(req_id)
                    sample_rows.append(row - 1)
            elif c.sample:
                sample_ids.append(req_id)
                sample_rows.append(row)
                row += 1
        batch = build_forward_batch([c for _, c in decode + prefill], self.block_size, self.device)
        return batch, sample_ids, sample_rows, spans


@dataclass
class PromptSpan:
    """One chunk's prompt-logprob rows: out[logits_indices][row + i] predicts prompt token position + i."""
    req_id: str
    row: int                                # first row in out[logits_indices]
    position: int                           # prompt position of the first target (>= 1)
    targets: list[int]                      # [N] the prompt tokens at position .. position + N - 1
    k: int                                  # top-k asked


def _take(rows: torch.Tensor, index: list[int]) -> torch.Tensor:
    """rows[index], without a copy when index takes every row in order."""
    return rows if len(index) == rows.shape[0] else rows[index]
