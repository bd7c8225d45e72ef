"""Vocab-parallel embedding and LM head: each TP rank owns a contiguous slice of the (padded) vocab."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.distributed.comm import all_reduce, gather_to_first
from shardserve.distributed.parallel_state import ParallelGroup
from shardserve.kernels.cpu import fused_ops, greedy_head
from shardserve.model.layers import formats
from shardserve.model.layers.linear import LinearBase, copy_into, read_slice


class VocabShard:
    """Rank r owns token ids [start, end); every shard has `padded` rows so all-gathers line up."""

    def __init__(self, vocab_size: int, tp: ParallelGroup):
        self.vocab_size = vocab_size
        self.padded = math.ceil(vocab_size / tp.size)              # rows per rank, padding included
        self.start = min(tp.rank_in_group * self.padded, vocab_size)
        self.end = min(self.start + self.padded, vocab_size)
        self.size = self.end - self.start                          # real rows on this rank (may be < padded)

    def load(self, param: torch.Tensor, loaded, read=read_slice) -> None:
        """This rank's rows of a [vocab, ...] checkpoint tensor, cut by `read` (a format's reader)."""
        param.data.zero_()                                         # padding rows stay zero (zero blocks too)
        if self.size:
            copy_into(param.data.narrow(0, 0, self.size), read(loaded, 0, self.start, self.size))


class VocabParallelEmbedding(nn.Module):
    """Token ids -> rows of this rank's vocab slice. Rows are stored dense in the activation dtype, or as GGUF
    blocks (`use_format`), dequantized per looked-up row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: ParallelGroup, dtype=torch.float32):
        super().__init__()
        self.tp, self.shard, self.hidden_size, self.dtype = tp, VocabShard(vocab_size, tp), hidden_size, dtype
        self.use_format("dense")

    def use_format(self, fmt: str) -> None:
        """Store rows as `fmt`: "dense" (the activation dtype) or a GGUF block format (formats.GGUF_BLOCK_FORMATS)."""
        self.format = fmt
        if fmt == "dense":
            weight = torch.empty(self.shard.padded, self.hidden_size, dtype=self.dtype)
            read, self.rows = read_slice, self._dense_rows
        else:
            weight = torch.empty(self.shard.padded, formats.block_row_bytes(fmt, self.hidden_size), dtype=torch.uint8)
            read, self.rows = formats.read_blocks, self._block_rows
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight.weight_loader = lambda param, loaded, shard_id=None: self.shard.load(param, loaded, read)

    def read_rows_from(self, rows) -> None:
        """Look rows up with `rows(local_ids)` (a tied LM head's packed copy of the same rows) and drop this layer's
        own copy."""
        self.rows = rows
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def _dense_rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(local_ids, self.weight)

    def _block_rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        return formats.block_rows(self.weight, self.format, self.hidden_size, local_ids).to(self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]; ids outside this rank's slice contribute zeros to the all-reduce."""
        if self.tp.size == 1:
            return self.rows(input_ids)
        local = input_ids - self.shard.start
        mine = (local >= 0) & (local < self.shard.size)
        out = self.rows(torch.where(mine, local, 0))
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return all_reduce(out, self.tp)


class ParallelLMHead(LinearBase):
    """hidden -> logits over the vocab: local logits [N, padded], all-gathered, padding trimmed."""

    keep_rows = True        # GGUF blocks stay in rows (not quant_panels' layout): a tied embedding reads them

    def __init__(self, vocab_size: int, hidden_size: int, tp: ParallelGroup, dtype=torch.float32):
        self.tp, self.shard = tp, VocabShard(vocab_size, tp)
        super().__init__(hidden_size, self.shard.padded, False, dtype)
        self.screen: greedy_head.GreedyScreen | None = None              # built after loading where supported

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        self.shard.load(param, loaded, self.method.read)

    def process_weights_after_loading(self) -> None:
        super().process_weights_after_loading()
        if (isinstance(self.method, formats.PanelF32Method) and self.packed_rows and self.shard.size
                and greedy_head.supported()):
            self.screen = greedy_head.GreedyScreen(self.packed, self.shard.size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N, vocab] logits on tp_rank 0 (the only rank that samples); None elsewhere."""
        logits = gather_to_first(self.matmul(hidden, None), self.tp, dim=-1)    # [N, padded * tp]
        # Shards are contiguous and only the tail carries padding, so the real vocab comes first.
        return None if logits is None else logits[:, : self.shard.vocab_size]

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[N, hidden] -> [N] int64 greedy tokens on tp_rank 0 (None elsewhere): argmax of forward()'s logits, the
        first maximum (NaN counts as the maximum). Each rank finds its shard's winner and its logit; only those
        [N, 2] travel, and the first rank holding the overall first maximum wins (shards are in vocab order)."""
        values, indices = self._local_argmax(hidden)
        pairs = torch.stack([values.double(), (indices + self.shard.start).double()], dim=-1)   # exact in float64
        gathered = gather_to_first(pairs.unsqueeze(1), self.tp, dim=1)                          # [N, tp, 2]
        if gathered is None:
            return None
        winner = gathered[..., 0].argmax(dim=1, keepdim=True)                                  # first max, NaN wins
        return gathered[..., 1].gather(1, winner).squeeze(1).long()

    def _local_argmax(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [N] of the first maximal logit over this rank's real vocab rows."""
        if self.shard.size == 0:                       # a rank past the vocab's end (tiny vocab, large tp)
            return (torch.full(hidden.shape[:1], -math.inf, device=hidden.device),
                    torch.zeros(hidden.shape[:1], dtype=torch.int64, device=hidden.device))
        if self.screen is not None and greedy_head.applies(hidden, self.packed):
            return self.screen.argmax(hidden)
        logits = self.matmul(hidden, None)[:, : self.shard.size].float()
        indices = fused_ops.argmax_rows(logits)
        if indices is None:
            indices = logits.argmax(dim=-1)
        return logits.gather(1, indices.unsqueeze(1)).squeeze(1), indices
