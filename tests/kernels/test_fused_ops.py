"""The C fused ops (RMSNorm, rotary, SiLU*mul, KV write, argmax) give the torch results, and the layers use them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shardserve.distributed.parallel_state import ParallelContext
from shardserve.kernels.cpu import fused_ops, native
from shardserve.model.layers.norm import RMSNorm
from shardserve.model.layers.rotary import RotaryEmbedding
from shardserve.model.llama import LlamaMLP

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="no C compiler here (or SHARDSERVE_CPU_KERNELS=torch): kernels not built")


def _both(monkeypatch, fn):
    """fn() with the C kernels, then with SHARDSERVE_CPU_KERNELS=torch."""
    native_out = fn()
    with monkeypatch.context() as m:
        m.setenv("SHARDSERVE_CPU_KERNELS", "torch")
        torch_out = fn()
    return native_out, torch_out


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(monkeypatch, rows, with_residual):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=gen)
    x, residual = torch.randn(rows, 576, generator=gen) * 3, torch.randn(rows, 576, generator=gen)
    fused, reference = _both(monkeypatch, lambda: norm(x, residual if with_residual else None))
    if with_residual:
        torch.testing.assert_close(fused[1], reference[1], rtol=0, atol=0)      # the sum is exact
        fused, reference = fused[0], reference[0]
    torch.testing.assert_close(fused, reference, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 16)])
def test_rotary_on_views_of_fused_qkv(monkeypatch, heads, kv_heads, head_dim):
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    t = 37
    gen = torch.Generator().manual_seed(heads)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 512, (t,), generator=gen)
    calls = []
    real = fused_ops.rotary
    monkeypatch.setattr(fused_ops, "rotary", lambda *a: calls.append(1) or real(*a))
    fused, reference = _both(monkeypatch, lambda: rotary(positions, q.view(t, heads, head_dim),
                                                         k.view(t, kv_heads, head_dim)))
    assert len(calls) == 4                         # q and k, each run
    for a, b in zip(fused, reference):
        assert a.is_contiguous() and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 64, 2048])
def test_silu_and_mul(monkeypatch, rows):
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 96, generator=gen) * 6        # exp's whole useful range, both signs
    fused = fused_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)
    assert fused_ops.silu_and_mul(gate_up.to(torch.float64)) is None         # not float32: torch path


def test_mlp_uses_the_fused_activation(monkeypatch):
    spec = SimpleNamespace(hidden_size=32, intermediate_size=48, mlp_split_unit=1)      # all LlamaMLP reads
    mlp = LlamaMLP(spec, ParallelContext.single(torch.device("cpu")), torch.float32)
    for p in mlp.parameters():
        p.data.normal_(generator=torch.Generator().manual_seed(3))
    calls = []
    real = fused_ops.silu_and_mul
    monkeypatch.setattr(fused_ops, "silu_and_mul", lambda x: calls.append(1) or real(x))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    fused, reference = _both(monkeypatch, lambda: mlp(x))
    assert calls == [1, 1]
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 64, 2048])
def test_kv_write_from_views_of_fused_qkv(monkeypatch, rows):
    """K and V land in the slots index_copy_ puts them in, V read straight from the qkv output's columns."""
    gen = torch.Generator().manual_seed(rows)
    kv_heads, head_dim, num_slots = 3, 64, 4096
    qkv = torch.randn(rows, (9 + 2 * kv_heads) * head_dim, generator=gen)
    k = torch.randn(rows, kv_heads, head_dim, generator=gen)
    v = qkv[:, -kv_heads * head_dim:].view(rows, kv_heads, head_dim)              # row stride 960, not 192
    slots = torch.randperm(num_slots, generator=gen)[:rows]

    def write():
        caches = torch.zeros(num_slots, kv_heads, head_dim), torch.zeros(num_slots, kv_heads, head_dim)
        if not fused_ops.write_kv(k, v, slots, *caches):
            caches[0].index_copy_(0, slots, k)
            caches[1].index_copy_(0, slots, v)
        return caches

    fused, reference = _both(monkeypatch, write)
    assert fused_ops.write_kv(k, v, slots, *write())                            # the C path was the one taken
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kv_write_refuses_slots_outside_the_cache():
    k_cache, v_cache = torch.zeros(16, 2, 8), torch.zeros(16, 2, 8)
    k = v = torch.ones(3, 2, 8)
    with pytest.raises(IndexError, match=r"1 slot\(s\) outside the cache's 16 slots"):
        fused_ops.write_kv(k, v, torch.tensor([0, 16, 5]), k_cache, v_cache)
    assert k_cache[0].eq(1).all() and k_cache[5].eq(1).all()                    # the good rows were written


def _argmax_cases():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 1000, generator=gen)
    x[1, [17, 400, 999]] = 50.0                                     # ties: the first one wins
    x[2, [5, 700]] = float("nan")                                   # NaN counts as the maximum, first NaN wins
    x[3] = float("-inf")                                            # nothing finite: index 0
    x[4, 300] = float("inf")
    x[5, 999] = 1e30                                                # the maximum in the last, partial chunk
    x[6, [64, 128]] = 40.0                                          # on chunk edges
    x[7, 0] = float("nan")
    x[8, 63] = 1e30
    return {"varied": x, "padded vocab view": torch.randn(4, 1100, generator=gen)[:, :1000],
            "batch 64 x 49152": torch.randn(64, 49152, generator=gen), "one column": torch.randn(5, 1, generator=gen)}


@pytest.mark.parametrize("case", list(_argmax_cases()))
def test_argmax_rows_matches_torch(case):
    x = _argmax_cases()[case]
    got = fused_ops.argmax_rows(x)
    assert got is not None and got.dtype == torch.int64
    assert got.tolist() == x.argmax(dim=-1).tolist()


def test_greedy_sampling_takes_the_kernel(monkeypatch):
    from shardserve.model.layers import sampler
    from shardserve.sampling_params import SamplingParams
    calls = []
    real = fused_ops.argmax_rows
    monkeypatch.setattr(fused_ops, "argmax_rows", lambda x: calls.append(x.shape) or real(x))
    logits = torch.randn(3, 50)
    reqs = [sampler.SampleRequest(SamplingParams(temperature=0.0, max_tokens=4), 0, [1], []) for _ in range(3)]
    assert sampler.sample(logits.clone(), reqs, ()).token_ids == logits.argmax(-1).tolist()
    assert calls == [(3, 50)]
