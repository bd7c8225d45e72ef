"""Each TP layer, sharded over 2 and 4 real processes, equals the unsharded computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ranks import run_ranks

torch.manual_seed(0)
HIDDEN, HEAD_DIM = 48, 8


def _weights(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def column_and_row(ctx, x, w1, w2, b2):
    from shardserve.model.layers.linear import ColumnParallelLinear, RowParallelLinear
    col = ColumnParallelLinear(w1.shape[1], [w1.shape[0]], ctx.tp)
    col.weight.weight_loader(col.weight, w1)
    row = RowParallelLinear(w2.shape[1], w2.shape[0], ctx.tp, bias=True)
    row.weight.weight_loader(row.weight, w2)
    row.bias.weight_loader(row.bias, b2)
    return row(col(x))                                  # column shard feeds the row shard: no gather between


def merged_gate_up(ctx, x, gate, up, down):
    from shardserve.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    gu = MergedColumnParallelLinear(gate.shape[1], [gate.shape[0]] * 2, ctx.tp)
    gu.weight.weight_loader(gu.weight, gate, 0)
    gu.weight.weight_loader(gu.weight, up, 1)
    dn = RowParallelLinear(down.shape[1], down.shape[0], ctx.tp)
    dn.weight.weight_loader(dn.weight, down)
    g, u = gu(x).chunk(2, dim=-1)
    return dn(F.silu(g) * u)


def qkv_attention_out(ctx, x, wq, wk, wv, bq, bk, bv, wo, heads, kv_heads):
    """q/k/v projections and an (unrotated, full) attention per local head, then o_proj: exercises the head split."""
    from shardserve.model.layers.linear import QKVParallelLinear, RowParallelLinear
    qkv = QKVParallelLinear(x.shape[1], HEAD_DIM, heads, kv_heads, ctx.tp, bias=True)
    for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
        qkv.weight.weight_loader(qkv.weight, w, sid)
        qkv.bias.weight_loader(qkv.bias, b, sid)
    h = qkv.heads
    o = RowParallelLinear(heads * HEAD_DIM, x.shape[1], ctx.tp, shard=(h.q_start * HEAD_DIM, h.q_count * HEAD_DIM))
    o.weight.weight_loader(o.weight, wo)
    q, k, v = qkv(x).split(qkv.output_split, dim=-1)
    t = x.shape[0]
    attn = F.scaled_dot_product_attention(q.view(t, -1, HEAD_DIM).transpose(0, 1), k.view(t, -1, HEAD_DIM).transpose(0, 1),
                                          v.view(t, -1, HEAD_DIM).transpose(0, 1), is_causal=True, enable_gqa=True)
    return o(attn.transpose(0, 1).reshape(t, -1))


def vocab_embed_and_head(ctx, ids, emb, hidden):
    from shardserve.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    e = VocabParallelEmbedding(emb.shape[0], emb.shape[1], ctx.tp)
    e.weight.weight_loader(e.weight, emb)
    head = ParallelLMHead(emb.shape[0], emb.shape[1], ctx.tp)
    head.weight.weight_loader(head.weight, emb)
    head.process_weights_after_loading()
    return e(ids), head(hidden)


def lm_head_logits_and_greedy(ctx, emb, hidden):
    from shardserve.model.layers.embedding import ParallelLMHead
    head = ParallelLMHead(emb.shape[0], emb.shape[1], ctx.tp)
    head.weight.weight_loader(head.weight, emb)
    head.process_weights_after_loading()
    return head(hidden), head.greedy(hidden)


def reference_attention(x, wq, wk, wv, bq, bk, bv, wo, heads, kv_heads):
    t = x.shape[0]
    q = (x @ wq.T + bq).view(t, heads, HEAD_DIM).transpose(0, 1)
    k = (x @ wk.T + bk).view(t, kv_heads, HEAD_DIM).transpose(0, 1)
    v = (x @ wv.T + bv).view(t, kv_heads, HEAD_DIM).transpose(0, 1)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return a.transpose(0, 1).reshape(t, -1) @ wo.T


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("use_shm", [True, False])
def test_column_row(world, use_shm):
    x, w1, w2, b2 = _weights(1, 5, HIDDEN), _weights(2, 103, HIDDEN), _weights(3, HIDDEN, 103), _weights(4, HIDDEN)
    expected = F.linear(F.linear(x, w1), w2, b2)
    for out in run_ranks(column_and_row, world, x, w1, w2, b2, use_shm=use_shm):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_merged_mlp_uneven_width(world):
    inter = 67                                              # divides by neither 2 nor 4
    x, gate, up, down = _weights(1, 6, HIDDEN), _weights(2, inter, HIDDEN), _weights(3, inter, HIDDEN), _weights(4, HIDDEN, inter)
    expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    outs = run_ranks(merged_gate_up, world, x, gate, up, down)
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(outs[0], o) for o in outs), "TP ranks must agree bit for bit"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,heads,kv_heads", [(2, 4, 2), (4, 4, 2), (2, 9, 3), (4, 9, 3), (4, 4, 1), (2, 6, 3)])
def test_qkv_head_split_with_kv_replication(world, heads, kv_heads):
    x = _weights(1, 7, HIDDEN)
    wq, wk, wv = _weights(2, heads * HEAD_DIM, HIDDEN), _weights(3, kv_heads * HEAD_DIM, HIDDEN), _weights(4, kv_heads * HEAD_DIM, HIDDEN)
    bq, bk, bv = _weights(5, heads * HEAD_DIM), _weights(6, kv_heads * HEAD_DIM), _weights(7, kv_heads * HEAD_DIM)
    wo = _weights(8, HIDDEN, heads * HEAD_DIM)
    args = (x, wq, wk, wv, bq, bk, bv, wo, heads, kv_heads)
    expected = reference_attention(*args)
    for out in run_ranks(qkv_attention_out, world, *args):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_embedding_and_lm_head_with_padding(world):
    vocab = 1003                                            # divides by neither 2 nor 4: the last shard is padded
    emb = _weights(1, vocab, HIDDEN)
    ids = torch.tensor([0, 1, 250, 251, 500, 501, 752, 753, 1002])
    hidden = _weights(2, 4, HIDDEN)
    results = run_ranks(vocab_embed_and_head, world, ids, emb, hidden)
    for rank, (e_out, logits) in enumerate(results):
        torch.testing.assert_close(e_out, emb[ids])
        if rank > 0:
            assert logits is None                           # only tp_rank 0 samples, so only it gets logits
            continue
        assert logits.shape == (4, vocab)                   # padding trimmed: never sampled
        torch.testing.assert_close(logits, hidden @ emb.T, rtol=1e-4, atol=1e-3)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world, vocab", [(2, 1003), (4, 1003), (4, 9)])
def test_lm_head_greedy_is_the_argmax_of_the_gathered_logits(world, vocab):
    """Each rank's winner, gathered: equals argmax over all logits, ties to the first row even across shards
    (rows 3 and vocab - 2 are equal and the largest for hidden row 0), NaN rows as torch.argmax has them.
    (4, 9): 3 rows per rank, so rank 3 owns no vocab at all."""
    emb = _weights(3, vocab, HIDDEN)
    emb[3] = emb[vocab - 2] = emb[3] * 4
    hidden = _weights(4, 5, HIDDEN)
    hidden[0] = emb[3]
    hidden[4, 1] = float("nan")
    results = run_ranks(lm_head_logits_and_greedy, world, emb, hidden)
    logits, tokens = results[0]
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert tokens[0] == 3 and tokens[4] == 0
    assert all(r == (None, None) for r in results[1:])
