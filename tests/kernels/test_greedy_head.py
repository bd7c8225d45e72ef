"""The bf16-screened greedy LM head returns exactly the float32 logits' argmax (first maximum, NaN wins) and value."""
from __future__ import annotations

import pytest
import torch

from shardserve.kernels.cpu import greedy_head, native_linear
from shardserve.model.layers.sampler import SampleRequest, argmax_suffices
from shardserve.sampling_params import SamplingParams

needs_bf16 = pytest.mark.skipif(not greedy_head.supported(),
                                reason="the screen needs the C kernels on a CPU with AVX512-BF16 (VDPBF16PS)")


def _full(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return native_linear.linear(x, packed, None, packed.shape[0] * 16)[:, :n]


def _check(x, weight, n_valid=None, threads=2):
    n_valid = weight.shape[0] if n_valid is None else n_valid
    packed = native_linear.pack(weight)
    screen = greedy_head.GreedyScreen(packed, n_valid)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, indices = screen.argmax(x)
        logits = _full(x, packed, n_valid)
    finally:
        torch.set_num_threads(before)
    expected = logits.argmax(dim=-1)
    assert torch.equal(indices, expected)
    # bit-identical values (NaN where the winner is NaN)
    torch.testing.assert_close(values, logits.gather(1, expected[:, None])[:, 0], rtol=0, atol=0, equal_nan=True)
    return screen


@needs_bf16
@pytest.mark.parametrize("rows, vocab, hidden", [(1, 300, 64), (7, 1000, 63), (64, 4099, 96), (150, 2050, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_random_heads_match_float32_argmax(rows, vocab, hidden, threads):
    gen = torch.Generator().manual_seed(rows * vocab + hidden)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.1
    x = torch.randn(rows, hidden, generator=gen) * 4
    screen = _check(x, weight, threads=threads)
    assert screen.full_rows == 0                         # the screen decided every row (no float32 fallback)


@needs_bf16
def test_near_ties_are_decided_in_float32():
    """Rows differing in the last bits of one weight look equal through bf16; the exact logits decide, and an exact
    tie goes to the first row, as torch.argmax does."""
    gen = torch.Generator().manual_seed(3)
    hidden = 64
    base = torch.randn(hidden, generator=gen)
    weight = torch.randn(2000, hidden, generator=gen) * 0.05
    for i, row in enumerate([1500, 37, 901, 1999, 640]):              # near copies of `base`, out of order
        weight[row] = base
        weight[row, i] = base[i] + 1e-6 * (i - 2)
    weight[1200] = base                                               # exact copy: tied with nothing larger
    x = torch.stack([base * s for s in (1.0, 3.0, -2.0, 0.5)] + [torch.randn(hidden, generator=gen)])
    _check(x, weight)
    tied = weight.clone()
    tied[77] = tied[1500] = base * 1.001                              # the largest logit, twice
    _, indices = _check(x[:1] * 10, tied).argmax(x[:1] * 10)
    assert indices.tolist() == [77]


@needs_bf16
def test_columns_past_the_valid_vocab_never_win():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(100, 32, generator=gen)
    weight[95:] *= 50                                                 # padding / another shard's rows: largest
    x = torch.randn(6, 32, generator=gen)
    values, indices = greedy_head.GreedyScreen(native_linear.pack(weight), 95).argmax(x)
    assert int(indices.max()) < 95
    _check(x, weight, n_valid=95)


@needs_bf16
def test_non_finite_rows_take_the_float32_path():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(500, 48, generator=gen)
    x = torch.randn(5, 48, generator=gen)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    screen = _check(x, weight)
    assert screen.full_rows == 2
    weight[321, 7] = float("inf")                                     # one column +-inf or NaN for every row
    screen = _check(x, weight)
    assert screen.full_rows == 5


@needs_bf16
def test_the_bound_keeps_a_row_whose_bf16_logit_rounds_down(monkeypatch):
    """Column 5's weights sit just above a bf16 rounding midpoint (round up), column 25's just below (round down),
    so bf16 ranks 5 two logits ahead although 25 (another panel) is larger in float32. The bound keeps 25 a
    candidate; a bound eight times smaller drops it and answers 5 (this test fails if the factor loses that much)."""
    hidden = 512
    weight = torch.randn(40, hidden, generator=torch.Generator().manual_seed(6)) * 0.01
    weight[5] = weight[25] = 1.0
    weight[5, :256] = 1 + 2.0 ** -8 + 2.0 ** -20            # bf16: 1 + 2^-7
    weight[25, :256] = 1 + 2.0 ** -8 - 2.0 ** -20           # bf16: 1
    weight[25, 300] = 1 + 2.0 ** -7                          # exact in bf16: 25 wins in float32 by ~2^-7
    x = torch.ones(1, hidden)
    _, indices = greedy_head.GreedyScreen(native_linear.pack(weight), 40).argmax(x)
    assert indices.tolist() == [25]
    _check(x, weight)
    monkeypatch.setattr(greedy_head, "bound_factor", lambda k: 2.0 ** -10)
    _, indices = greedy_head.GreedyScreen(native_linear.pack(weight), 40).argmax(x)
    assert indices.tolist() == [5]


def test_argmax_suffices_only_for_plain_greedy():
    def req(outputs=0, **kw):
        return SampleRequest(SamplingParams(**kw), 0, [1, 2], list(range(outputs)))

    assert argmax_suffices(req(temperature=0.0))
    assert argmax_suffices(req(3, temperature=0.0, min_tokens=3, ignore_eos=True, top_k=5))
    assert not argmax_suffices(req(2, temperature=0.0, min_tokens=3))        # EOS still banned
    assert not argmax_suffices(req(temperature=0.7))
    assert not argmax_suffices(req(temperature=0.0, logprobs=0))
    assert not argmax_suffices(req(temperature=0.0, repetition_penalty=1.1))
    assert not argmax_suffices(req(temperature=0.0, presence_penalty=0.5))
    assert not argmax_suffices(req(temperature=0.0, frequency_penalty=-0.5))
