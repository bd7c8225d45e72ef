"""The vectorized sampler: top-k / top-p / min-p cuts as specified (C kernels and torch paths alike), draws that
follow the distribution, and seeded draws independent of the batch around them."""
from __future__ import annotations

import math

import pytest
import torch

from shardserve.model.layers import sampler
from shardserve.kernels.cpu import native
from shardserve.model.layers.sampler import SampleRequest, sample
from shardserve.sampling_params import SamplingParams


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    if request.param == "native" and not native.available():
        pytest.skip("the C kernels are not built here (no gcc)")
    monkeypatch.setenv("SHARDSERVE_CPU_KERNELS", request.param)
    return request.param


def _nucleus_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep v iff the mass of the tokens strictly more likely than v is below top_p (O(V^2), small V only)."""
    above = (probs[None, :] * (probs[None, :] > probs[:, None])).sum(dim=1)
    return above < top_p


def test_top_p_keeps_the_nucleus(kernels):
    gen = torch.Generator().manual_seed(0)
    rows = [torch.softmax(torch.randn(300, generator=gen) * s, dim=0) for s in (0.5, 2.0, 6.0)]
    tied = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.05, 0.05])               # ties across the cut stay together
    for probs in rows + [tied]:
        for top_p in (0.05, 0.5, 0.7, 0.9, 0.999):
            kept = sampler._top_p(probs[None].clone(), [top_p])[0] > 0
            assert torch.equal(kept, _nucleus_reference(probs, top_p)), (kernels, top_p)
    assert (sampler._top_p(tied[None].clone(), [0.35])[0] > 0).tolist() == [True, True, True, True, False, False]
    assert torch.equal(sampler._top_p(rows[0][None].clone(), [1.0])[0], rows[0])   # top_p = 1: untouched


def test_top_k_keeps_the_k_largest_and_their_ties(kernels):
    x = torch.tensor([[0.5, 3.0, -1.0, 3.0, 2.0, float("-inf"), 2.0, 0.0]] * 5)
    out = sampler._top_k(x.clone(), [1, 2, 3, 8, -1])
    kept = (out > float("-inf")).tolist()
    assert kept[0] == kept[1] == [False, True, False, True, False, False, False, False]
    assert kept[2] == [False, True, False, True, True, False, True, False]    # the 3rd largest (2.0) and its tie
    assert kept[3] == kept[4] == (x[0] > float("-inf")).tolist()              # k >= V or off: untouched
    big = torch.randn(3, 5000, generator=torch.Generator().manual_seed(1))
    for k in (1, 17, 4999):
        out = sampler._top_k(big.clone(), [k] * 3)
        assert ((out > float("-inf")).sum(dim=1) == k).all()
        assert torch.equal(out.amax(dim=1), big.amax(dim=1))


def test_inverse_cdf_follows_the_probabilities():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.05, 0.6, 0.0] + [0.0] * 70)   # V = 77: a padded last block
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tokens = sampler._inverse_cdf(probs.expand(n, -1).contiguous(), u)
    counts = torch.bincount(tokens, minlength=77).double() / n
    assert counts[probs == 0].sum() == 0                                      # never a token without mass
    for v in (1, 3, 4, 5):
        assert abs(counts[v] - probs[v]) < 4 * math.sqrt(probs[v] * (1 - probs[v]) / n)
    edges = torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64)
    assert sampler._inverse_cdf(probs.expand(2, -1).contiguous(), edges).tolist() == [1, 5]   # first, last with mass


def _requests(params: SamplingParams, n: int, position: int = 0) -> list[SampleRequest]:
    return [SampleRequest(params, seed, [1, 2, 3], [7] * position) for seed in range(n)]


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(temperature=1.0), [0.5, 0.3, 0.15, 0.05]),
    (SamplingParams(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0]),
    (SamplingParams(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0]),
    (SamplingParams(temperature=1.0, min_p=0.35), [0.625, 0.375, 0, 0]),
])
def test_sampled_frequencies(kernels, params, allowed):
    """Many seeds over one distribution: each token's frequency within 4 sigma of its (renormalized) share."""
    n = 4000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(n, -1).contiguous()
    tokens = torch.tensor(sample(logits.clone(), _requests(params, n), ()).token_ids)
    freq = torch.bincount(tokens, minlength=4).double() / n
    for f, p in zip(freq.tolist(), allowed):
        assert abs(f - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (freq, allowed)


def test_a_seeded_draw_ignores_the_batch_around_it(kernels):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1000, generator=gen) * 2
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9, seed=5),
             SamplingParams(temperature=1.2, top_k=20), SamplingParams(temperature=0.9, min_p=0.05, seed=8),
             SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.5, top_k=5, top_p=0.8)]
    reqs = [SampleRequest(p, 100 + i, [1, 2], [3] * i) for i, p in enumerate(mixed)]
    together = sample(logits.clone(), reqs, ()).token_ids
    alone = [sample(logits[i:i + 1].clone(), [r], ()).token_ids[0] for i, r in enumerate(reqs)]
    assert together == alone
    assert together[0] == int(logits[0].argmax()) and together[4] == int(logits[4].argmax())
    assert sample(logits.clone(), reqs, ()).token_ids == together                  # reproducible


def test_extreme_inputs_still_give_a_vocab_token(kernels):
    """Temperatures below 1e-5 decode greedily (vLLM's rule; dividing by them overflows); a row of NaN or
    all-zero probabilities still yields a token of the vocab (the engine must not fail on it)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(4)) * 5
    reqs = [SampleRequest(SamplingParams(temperature=t, seed=1), 1, [1], []) for t in (1e-300, 1e-6, 9.9e-6, 5e-324)]
    assert sample(logits.clone(), reqs, ()).token_ids == logits.argmax(dim=-1).tolist()
    odd = torch.zeros(3, 100)
    odd[0] = float("nan")
    odd[2, 99] = 1.0
    tokens = sampler._inverse_cdf(odd, torch.tensor([0.5, 0.5, 1 - 2 ** -53], dtype=torch.float64))
    assert tokens.tolist() == [0, 0, 99]


def _penalties_reference(row: torch.Tensor, req: SampleRequest, eos: tuple[int, ...]) -> None:
    """One row at a time, straight from the definitions."""
    p = req.params
    if len(req.output_token_ids) < p.min_tokens:
        for t in (*eos, *p.stop_token_ids):
            if t < row.shape[0]:
                row[t] = float("-inf")
    if p.repetition_penalty != 1.0:
        for t in set(req.prompt_token_ids) | set(req.output_token_ids):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(req.output_token_ids):
        row[t] -= p.frequency_penalty * req.output_token_ids.count(t) + p.presence_penalty


def test_penalties_match_their_definitions():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 50, generator=gen) * 3
    reqs = [SampleRequest(SamplingParams(repetition_penalty=1.3, min_tokens=3, stop_token_ids=[7, 60]), 0,
                          [1, 2, 2, 9], [4, 5]),
            SampleRequest(SamplingParams(presence_penalty=0.5, frequency_penalty=-0.7), 0, [3], [8, 8, 8, 1]),
            SampleRequest(SamplingParams(), 0, [1, 2], [3]),
            SampleRequest(SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, min_tokens=1), 0,
                          [10, 11], [])]
    got = logits.clone()
    sampler._apply_penalties(got, reqs, (0, 49))
    want = logits.clone()
    for row, req in zip(want, reqs):
        _penalties_reference(row, req, (0, 49))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[0, 0] == got[0, 49] == got[0, 7] == got[3, 0] == float("-inf")
    assert not torch.equal(got[:2], logits[:2]) and torch.equal(got[2], logits[2])
