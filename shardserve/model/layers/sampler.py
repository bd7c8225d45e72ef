"""Sampler: logits -> next tokens per request (logit_bias, penalties, temperature, top-k/p, min-p, a seeded draw).

The sampled rows of a step go through each stage together ([R, V] tensor ops, no per-row Python loop over the
vocab). The draw is one uniform per row, keyed by (request seed, output position), never by batch order or
layout, so a seeded request samples the same tokens under any TP/PP split, batch composition or preemption.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from shardserve.kernels.cpu import fused_ops, native
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
    no banned tokens (min_tokens reached), no logit_bias, so the sampler needs no logits (LM heads' `greedy`)."""
    p = req.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and len(req.output_token_ids) >= p.min_tokens and not p.logit_bias)


def sample(logits: torch.Tensor, requests: list[SampleRequest], eos_token_ids: tuple[int, ...]) -> SampleResult:
    """logits [S, V] float32, one row per request. The caller's buffer is scratch: penalties and the sampled rows'
    temperature apply to it in place (a copy costs ~2 ms per batch-64 step of a 49K vocab).

    logit_bias is added first, so everything after sees the biased logits: penalties, temperature, the greedy
    argmax, the draw and the returned logprobs (the log_softmax of the biased logits, before penalties)."""
    _apply_logit_bias(logits, requests)
    wants = [row for row, req in enumerate(requests) if req.params.logprobs is not None]
    raw = torch.log_softmax(logits[wants], dim=-1) if wants else None     # [W, V] the model's raw distribution
    _apply_penalties(logits, requests, eos_token_ids)
    sampled = [row for row, req in enumerate(requests) if not req.params.greedy]
    tokens = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
    if len(sampled) < len(requests):
        tokens = fused_ops.argmax_rows(logits)
        if tokens is None:
            tokens = logits.argmax(dim=-1)
    if sampled:
        rows = logits if len(sampled) == len(requests) else logits[sampled]
        tokens[sampled] = _sample_rows(rows, [requests[row] for row in sampled])
    token_ids = tokens.tolist()
    logprobs = [None] * len(requests)
    if wants:
        chosen = _top_logprobs(raw, [token_ids[row] for row in wants], [requests[row].params.logprobs for row in wants])
        for row, lp in zip(wants, chosen):
            logprobs[row] = lp
    return SampleResult(token_ids, logprobs)


def _apply_logit_bias(logits: torch.Tensor, requests: list[SampleRequest]) -> None:
    """In place, all rows at once (one indexed add): each request's logit_bias {token: bias} onto its row. Token ids
    are checked against the vocab when the request is added (LLMEngine.validate_params); any past this row's
    width are skipped rather than crash the worker."""
    vocab = logits.shape[1]
    rows, tokens, biases = [], [], []
    for row, req in enumerate(requests):
        bias = req.params.logit_bias
        if bias:
            for token, value in bias.items():
                if token < vocab:
                    rows.append(row)
                    tokens.append(token)
                    biases.append(value)
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(tokens, device=dev)] += torch.tensor(
            biases, dtype=logits.dtype, device=dev)


def _apply_penalties(logits: torch.Tensor, requests: list[SampleRequest], eos_token_ids: tuple[int, ...]) -> None:
    """In place, all rows at once (one indexed op per kind, not per row): EOS and stop tokens banned before
    min_tokens; repetition_penalty divides the positive logits of tokens seen in prompt or output and multiplies
    the negative ones; frequency (per occurrence) and presence (once) penalties subtract for output tokens."""
    vocab = logits.shape[1]
    ban_rows, ban_tokens = [], []
    rep_rows, rep_tokens, rep_factors = [], [], []
    pen_rows, pen_tokens, pen_amounts = [], [], []
    for row, req in enumerate(requests):
        p = req.params
        if len(req.output_token_ids) < p.min_tokens:
            banned = [t for t in {*eos_token_ids, *p.stop_token_ids} if t < vocab]
            ban_rows += [row] * len(banned)
            ban_tokens += banned
        if p.repetition_penalty != 1.0:
            seen = set(req.prompt_token_ids) | set(req.output_token_ids)
            rep_rows += [row] * len(seen)
            rep_tokens += seen
            rep_factors += [p.repetition_penalty] * len(seen)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            counts = Counter(req.output_token_ids)
            pen_rows += [row] * len(counts)
            pen_tokens += counts
            pen_amounts += [p.frequency_penalty * n + p.presence_penalty for n in counts.values()]

    def tensor(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=logits.device)

    if ban_rows:
        logits[tensor(ban_rows), tensor(ban_tokens)] = float("-inf")
    if rep_rows:
        at, factor = (tensor(rep_rows), tensor(rep_tokens)), tensor(rep_factors, logits.dtype)
        vals = logits[at]
        logits[at] = torch.where(vals > 0, vals / factor, vals * factor)
    if pen_rows:
        logits[tensor(pen_rows), tensor(pen_tokens)] -= tensor(pen_amounts, logits.dtype)


def _sample_rows(logits: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
    """logits [R, V] (scratch: changed in place) of rows with temperature > 0 -> [R] sampled token ids:
    temperature, top-k (ties with the k-th logit kept), softmax, top-p (the most likely tokens until their mass
    reaches top_p), min-p (relative to the row's top probability), then one seeded uniform draw from the rest."""
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in reqs], dtype=logits.dtype, device=dev)
    x = _top_k(logits.div_(temps[:, None]), [r.params.top_k for r in reqs])
    probs = _top_p(torch.softmax(x, dim=-1), [r.params.top_p for r in reqs])
    if any(r.params.min_p > 0 for r in reqs):
        min_p = torch.tensor([r.params.min_p for r in reqs], dtype=probs.dtype, device=dev)
        probs.masked_fill_(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    u = torch.tensor([_uniform(r.seed, len(r.output_token_ids)) for r in reqs], dtype=torch.float64, device=dev)
    return _inverse_cdf(probs, u)


def _top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Rows with 0 < k < V keep the logits >= their k-th largest (ties kept); the others are left whole. In place
    (x is the caller's temperature-scaled copy): sampling.c's bisection on the CPU, else torch.topk."""
    vocab = x.shape[1]
    rows = [i for i, k in enumerate(ks) if 0 < k < vocab]
    if not rows:
        return x
    if native.applies(x) and x.stride(1) == 1:
        k = torch.tensor(ks, dtype=torch.int64)                        # held through the call
        native.lib().top_k_filter_f32(x.data_ptr(), x.stride(0), x.shape[0], vocab, k.data_ptr(),
                                      torch.get_num_threads())
        return x
    k = torch.tensor([ks[i] for i in rows], device=x.device)[:, None]
    kth = torch.full((x.shape[0], 1), float("-inf"), dtype=x.dtype, device=x.device)
    kth[rows] = torch.topk(x[rows], int(k.max()), dim=-1).values.gather(1, k - 1)
    return x.masked_fill_(x < kth, float("-inf"))


def _top_p(probs: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Rows with top_p < 1 keep token v iff the mass of the tokens strictly more likely than v is below top_p: the
    most likely tokens until their mass reaches top_p (the top token always stays; equal probabilities stay or go
    together). The cut is a threshold, found by bisection (sampling.c on the CPU, in place), not by sorting the
    vocab."""
    if all(p >= 1.0 for p in ps):
        return probs
    top_p = torch.tensor(ps, dtype=torch.float32, device=probs.device)
    if native.applies(probs) and probs.stride(1) == 1:                 # in place: probs is the caller's softmax
        cut = torch.empty_like(top_p)                                   # held through the call: C writes it
        native.lib().top_p_filter_f32(probs.data_ptr(), probs.stride(0), probs.shape[0], probs.shape[1],
                                      top_p.data_ptr(), cut.data_ptr(), torch.get_num_threads())
        return probs
    return probs.masked_fill(probs < _top_p_threshold(probs, top_p)[:, None], 0.0)


def _top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """sampling.c's threshold in torch (other devices, kernels off): per row the smallest float t with
    mass(p > t) < top_p, bisected over t's bits (non-negative floats order as their int32 bits); 0 where top_p is 1."""
    lo = torch.zeros_like(top_p, dtype=torch.int32)
    hi = torch.where(top_p < 1, probs.amax(dim=-1).view(torch.int32), 0)    # mass above the top is 0; no cut at 1
    wide = probs.double()
    while bool((lo < hi).any()):
        mid = lo + (hi - lo) // 2
        mass = torch.where(wide > mid.view(torch.float32)[:, None].double(), wide, 0.0).sum(dim=-1)
        below = mass < top_p.double()
        hi, lo = torch.where(below, mid, hi), torch.where(below, lo, mid + 1)
    return lo.view(torch.float32)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (not normalized, >= 0), u [R] in [0, 1) float64 -> [R] the first token whose running mass
    exceeds u * total: token v with probability probs[v] / total. Two levels, so the running sums are float64 over
    float32 values without a float64 copy of [R, V]: 64-token blocks' sums, then the chosen block's tokens."""
    rows, vocab = probs.shape
    block = 64
    padded = (probs if vocab % block == 0 else torch.nn.functional.pad(probs, (0, -vocab % block)))
    padded = padded.view(rows, -1, block)                                               # [R, nb, 64]
    block_mass = padded.sum(dim=-1).double().cumsum(dim=-1)                             # [R, nb]
    target = (u * block_mass[:, -1])[:, None]                                           # [R, 1]
    b = torch.searchsorted(block_mass, target, right=True).clamp(max=block_mass.shape[1] - 1)   # [R, 1]
    before = torch.where(b > 0, block_mass.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = padded.gather(1, b[:, :, None].expand(rows, 1, block)).squeeze(1)          # [R, 64]
    running = before + inside.double().cumsum(dim=-1)
    t = torch.searchsorted(running, target, right=True).clamp(max=block - 1)            # [R, 1]
    # rounding can leave the target past the block's last running sum: take its last token with mass then
    last = block - 1 - (inside > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    t = torch.where(inside.gather(1, t) > 0, t, torch.minimum(t, last))
    token = (b * block + t).squeeze(1).clamp(max=vocab - 1)
    # a row whose pick holds no mass (NaN from extreme logits, or rounding into an empty tail block): its argmax
    # (first NaN, as torch.argmax), so the engine always gets a token of the vocab
    has_mass = probs.gather(1, token[:, None]).squeeze(1) > 0
    if bool(has_mass.all()):
        return token
    return torch.where(has_mass, token, probs.argmax(dim=-1))


def _uniform(seed: int, position: int) -> float:
    """The draw for one request's output position: a float64 in [0, 1) from a generator keyed by both."""
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + position * 7_919 + 0x5EED) % (2**63 - 1))
    return float(torch.rand(1, dtype=torch.float64, generator=gen))


def _top_logprobs(raw: torch.Tensor, tokens: list[int], ks: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """raw [W, V] logprobs -> per row (its token's logprob, its top-k (token, logprob) pairs, descending): one
    topk for all rows (a row's top k is the prefix of the rows' largest k)."""
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None]).squeeze(1).tolist()
    kmax = max(ks)
    top = torch.topk(raw, kmax, dim=-1) if kmax > 0 else None
    ids, vals = (top.indices.tolist(), top.values.tolist()) if top is not None else ([[]] * len(ks), [[]] * len(ks))
    return [(c, list(zip(ids[i][:k], vals[i][:k]))) for i, (c, k) in enumerate(zip(chosen, ks))]


def target_logprobs(logits: torch.Tensor, targets: list[int], k: int
                    ) -> tuple[list[float], list[int], list[list[tuple[int, float]]]]:
    """logits [N, V] (any float dtype; log_softmax in float32) and one target token per row -> per row: the
    target's logprob, its 1-based rank (1 + tokens strictly more likely, as vLLM), and the top-k (token, logprob)
    pairs, descending (empty for k = 0). Prompt logprobs: row i predicts targets[i]."""
    lp = torch.log_softmax(logits.float(), dim=-1)                                    # [N, V]
    index = torch.tensor(targets, dtype=torch.int64, device=lp.device)[:, None]      # [N, 1]
    chosen = lp.gather(1, index)                                                      # [N, 1]
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    if k > 0:
        top = torch.topk(lp, min(k, lp.shape[1]), dim=-1)                             # [N, k]
        pairs = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        pairs = [[] for _ in targets]
    return chosen.squeeze(1).tolist(), ranks, pairs
