"""ForwardBatch: everything one forward pass needs to know about the batch, built once per step.

Tokens are laid out decode-first: the first `num_decode` tokens are single-token decode steps (one per
sequence), then each prefill chunk in turn. KV slots are flat indices: block_id * block_size + offset.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSegment:
    start: int                          # first token of this chunk within the batch
    length: int                         # tokens in the chunk
    context_len: int                    # tokens attended to: cached prefix + this chunk
    context_slots: torch.Tensor | None  # [context_len] KV slots, None when the chunk is the whole context
    device: torch.device

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """[length, context_len] additive causal mask (0 visible, -inf not); built on first use, kept for the step."""
        cached = self.context_len - self.length       # query i sits at position cached + i, sees keys 0 .. cached + i
        return torch.full((self.length, self.context_len), float("-inf"), device=self.device).triu_(cached + 1)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor             # [T] long
    positions: torch.Tensor             # [T] long
    slot_mapping: torch.Tensor          # [T] long: where each token's K/V is written
    num_decode: int                     # B: the first B tokens are decode tokens
    decode_slots: torch.Tensor | None   # [B, L] KV slots of each decode sequence's context (padded)
    decode_bias: torch.Tensor | None    # [B, 1, 1, L] additive mask: 0 where the slot is real, -inf on padding
    decode_lens: torch.Tensor | None    # [B] context length of each decode sequence
    prefills: list[PrefillSegment] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None   # [S] rows whose hidden states are sampled

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @functools.cached_property
    def prefill_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks for the C kernel, built on first use and kept for the step: segs [N, 4] (first row,
        queries, context length, offset into slots) and slots [sum of contexts], each chunk's context slots."""
        segs, slots, offset = [], [], 0
        for seg in self.prefills:
            own = self.slot_mapping[seg.start: seg.start + seg.length]
            slots.append(own if seg.context_slots is None else seg.context_slots)
            segs.append([seg.start, seg.length, seg.context_len, offset])
            offset += seg.context_len
        return torch.tensor(segs, dtype=torch.long), torch.cat(slots).contiguous()

    @functools.cached_property
    def sampled_row_segs(self) -> torch.Tensor:
        """prefill_plan's segs [N, 4] cut to each chunk's last query where that row is sampled, and to no query
        where it is not: the attention a last layer needs when only the sampled rows' outputs are used."""
        segs = self.prefill_plan[0].clone()
        sampled = set(self.logits_indices.tolist()) if self.logits_indices is not None else set()
        for row in segs:
            first, last = int(row[0]), int(row[0] + row[1] - 1)
            if first in sampled and row[1] > 1:          # a chunk whose every row is read (SeqChunk.all_logits)
                continue
            row[0], row[1] = (last, 1) if last in sampled else (row[0], 0)
        return segs


@dataclass
class SeqChunk:
    """One sequence's part of a step: `token_ids` at positions [start, start + len)."""
    token_ids: list[int]
    start: int
    block_ids: list[int]
    sample: bool                        # this chunk ends at the sequence's last known token
    all_logits: bool = False            # every row's hidden state is read (prompt logprobs), not just the last


def build_forward_batch(chunks: list[SeqChunk], block_size: int, device: torch.device) -> ForwardBatch:
    """Chunks must be ordered decode-first (len 1 with start > 0 before any prefill chunk)."""
    ids, pos, slots, logits_rows = [], [], [], []
    decode: list[SeqChunk] = []
    prefills: list[PrefillSegment] = []
    for chunk in chunks:
        n, start = len(chunk.token_ids), chunk.start
        first = len(ids)
        ids += chunk.token_ids
        pos += range(start, start + n)
        slots += [_slot(chunk.block_ids, p, block_size) for p in range(start, start + n)]
        if chunk.all_logits:
            logits_rows += range(first, first + n)
        elif chunk.sample:
            logits_rows.append(first + n - 1)
        if n == 1 and start > 0 and not prefills:
            decode.append(chunk)
        else:
            prefills.append(_prefill_segment(first, n, start, chunk.block_ids, block_size, device))
    decode_slots = decode_bias = decode_lens = None
    if decode:
        decode_slots, decode_bias, decode_lens = _decode_context(decode, block_size, device)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)
    return ForwardBatch(as_long(ids), as_long(pos), as_long(slots), len(decode), decode_slots, decode_bias,
                        decode_lens, prefills, as_long(logits_rows))


def _slot(block_ids: list[int], position: int, block_size: int) -> int:
    return block_ids[position // block_size] * block_size + position % block_size


def _context_slots(block_ids: list[int], length: int, block_size: int) -> torch.Tensor:
    """[length] KV slots of positions 0 .. length-1."""
    blocks = torch.tensor(block_ids[: -(-length // block_size)], dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:length]


def _decode_context(decode: list[SeqChunk], block_size: int, device) -> tuple[torch.Tensor, ...]:
    """Slots [B, L] of every decode sequence's context (padded with slot 0), the bias [B, 1, 1, L], lengths [B]."""
    lengths = torch.tensor([c.start + 1 for c in decode])
    width = int(lengths.max())
    nblocks = -(-width // block_size)
    table = torch.zeros(len(decode), nblocks, dtype=torch.long)
    for row, c in enumerate(decode):
        used = c.block_ids[: -(-(c.start + 1) // block_size)]
        table[row, : len(used)] = torch.tensor(used, dtype=torch.long)
    slots = (table[:, :, None] * block_size + torch.arange(block_size)).reshape(len(decode), -1)[:, :width]
    mask = torch.arange(width)[None, :] < lengths[:, None]
    slots = torch.where(mask, slots, 0)                          # padding reads slot 0, masked out
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return slots.to(device), bias[:, None, None, :].to(device), lengths.to(device)


def _prefill_segment(first: int, n: int, start: int, block_ids: list[int], block_size: int, device) -> PrefillSegment:
    ctx = start + n
    slots = None if start == 0 else _context_slots(block_ids, ctx, block_size).to(device)
    return PrefillSegment(first, n, ctx, slots, device)
