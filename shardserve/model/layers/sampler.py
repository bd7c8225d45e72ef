"""Sampler: logits -> next tokens per request (penalties, temperature, top-k/p, min-p, seeded noise).

Randomness is keyed by (request seed, output position), never by batch order or layout, so a seeded
request samples the same tokens under any TP/PP split, batch composition or preemption.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.model.layers import fused_ops
from shardserve.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: (logprob of the sampled token, [(token, logprob)] top-k) or None when not asked
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def argmax_suffices(req: SampleRequest) -> bool:
    """True when this request's next token is the argmax of the raw logits: greedy, no logprobs, no penalties and
    no banned tokens (min_tokens reached), so the sampler needs no logits (LM heads' `greedy`)."""
    p = req.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and len(req.output_token_ids) >= p.min_tokens)


def sample(logits: torch.Tensor, requests: list[SampleRequest], eos_token_ids: tuple[int, ...]) -> SampleResult:
    """logits [S, V] float32, one row per request; penalties are applied to it in place (the caller's buffer:
    a copy cost 15 ms per batch-64 decode step of a 49K vocab)."""
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in requests):
        raw_logprobs = torch.log_softmax(logits, dim=-1)               # of the model's raw distribution
    for row, req in enumerate(requests):
        _apply_penalties(logits[row], req, eos_token_ids)
    tokens = fused_ops.argmax_rows(logits)
    if tokens is None:
        tokens = logits.argmax(dim=-1)
    for row, req in enumerate(requests):
        if not req.params.greedy:
            tokens[row] = _sample_row(logits[row], req)
    token_ids = tokens.tolist()
    logprobs = [None] * len(requests)
    if raw_logprobs is not None:
        for row, req in enumerate(requests):
            if req.params.logprobs is not None:
                logprobs[row] = _top_logprobs(raw_logprobs[row], token_ids[row], req.params.logprobs)
    return SampleResult(token_ids, logprobs)


def _apply_penalties(row: torch.Tensor, req: SampleRequest, eos_token_ids: tuple[int, ...]) -> None:
    p = req.params
    if len(req.output_token_ids) < p.min_tokens:
        banned = [t for t in (*eos_token_ids, *p.stop_token_ids) if t < row.shape[0]]
        row[banned] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), dtype=torch.long)
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        ids, counts = torch.tensor(req.output_token_ids, dtype=torch.long).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _sample_row(row: torch.Tensor, req: SampleRequest) -> int:
    p = req.params
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws exactly from p.
    gen = torch.Generator(device="cpu").manual_seed(_noise_key(req.seed, len(req.output_token_ids)))
    noise = torch.empty(row.shape[0], dtype=torch.float32).exponential_(generator=gen).to(row.device)
    return int((probs / noise).argmax())


def _noise_key(seed: int, position: int) -> int:
    return (seed * 1_000_003 + position * 7_919 + 0x5EED) % (2**63 - 1)


def _top_logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    top = torch.topk(row, k) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(row[token]), pairs
