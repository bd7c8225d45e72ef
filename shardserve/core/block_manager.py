"""BlockManager: paged KV-cache blocks with ref counts, LRU reuse and hash-based prefix caching."""
from __future__ import annotations

from collections import OrderedDict

from shardserve.core.sequence import Sequence


class Block:
    """One KV-cache block. `hash` is set once the block is full and computed (its content is final);
    it chains the parent block's hash, so equal hashes mean equal whole prefixes."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None   # kept to rule out hash collisions

    def reset(self) -> None:
        self.ref_count = 0
        self.hash = None
        self.token_ids = None


class BlockManager:
    """Invariants: ref_count >= 0; a block is in the free queue iff its ref_count is 0; a block with
    ref_count > 0 is never handed out again (so two live sequences share a block only through a prefix
    hash match); every entry of the prefix cache points to a block whose `hash` equals the key."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        # Free blocks (ref_count 0) in eviction order: the first is reused first. Blocks holding a cached
        # hash stay findable until reused; blocks holding nothing go to the front.
        self.free_list: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}     # block hash -> block id
        self._num_hashed: dict[str, int] = {}       # seq_id -> leading blocks of its table already hashed

    # -- sizes -------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, including evictable cached ones."""
        return len(self.free_list)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (0.0 when idle)."""
        return (self._num_blocks - len(self.free_list)) / self._num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    # -- prefix cache ------------------------------------------------------------------------------------
    @staticmethod
    def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent_hash, token_ids))

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], int]:
        """The longest run of cached full blocks that starts this token list; takes no references.
        At least one token always stays uncomputed (so the model produces logits): at most
        (len - 1) // block_size blocks."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self._block_size
        hit: list[int] = []
        parent: int | None = None
        for i in range((len(token_ids) - 1) // bs):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = self.hash_block(parent, toks)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != toks:
                break
            hit.append(block_id)
            parent = h
        return hit, len(hit) * bs

    def prefix_hit(self, seq: Sequence) -> tuple[list[int], int]:
        """match_prefix for a sequence's first allocation: none for one that needs logits at every prompt
        position (prompt_logprobs), since cached positions are not run."""
        if seq.needs_prompt_logits:
            return [], 0
        return self.match_prefix(seq.all_token_ids)

    # -- allocation --------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make seq.block_ids cover num_computed_tokens + num_new_tokens tokens. On a sequence's first
        allocation (no blocks yet) the prefix-cache hit is taken first and sets num_computed_tokens.
        All-or-nothing: returns False and changes nothing when there are not enough free blocks."""
        hit_ids: list[int] = []
        hit_tokens = 0
        first = not seq.block_ids
        if first:
            assert seq.num_computed_tokens == 0, f"{seq.seq_id}: computed tokens without blocks"
            hit_ids, hit_tokens = self.prefix_hit(seq)
        num_covered = (hit_tokens if first else seq.num_computed_tokens) + num_new_tokens
        num_have = len(hit_ids) if first else len(seq.block_ids)
        num_new_blocks = max(0, self.blocks_needed(num_covered) - num_have)
        # Hit blocks with no references sit in the free queue: reviving them costs free blocks too.
        num_revived = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_revived > len(self.free_list):
            return False
        if first:
            for b in hit_ids:
                self._take(b)
            seq.block_ids = list(hit_ids)
            seq.num_computed_tokens = hit_tokens
            seq.num_cached_prompt_tokens = min(hit_tokens, seq.num_prompt_tokens)
            self._num_hashed[seq.seq_id] = len(hit_ids)
        for _ in range(num_new_blocks):
            seq.block_ids.append(self._pop_free())
        return True

    def mark_computed(self, seq: Sequence) -> None:
        """Register in the prefix cache every newly full block whose tokens are all known and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self._block_size
        start = self._num_hashed.get(seq.seq_id, 0)
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_ids))
        if num_full <= start:
            return
        parent = self.blocks[seq.block_ids[start - 1]].hash if start > 0 else None
        for i in range(start, num_full):
            block = self.blocks[seq.block_ids[i]]
            toks = tuple(seq.token_ids_slice(i * bs, (i + 1) * bs))
            h = self.hash_block(parent, toks)
            if block.hash is None:
                block.hash, block.token_ids = h, toks
                self.hash_to_block.setdefault(h, block.block_id)  # a duplicate keeps the first block cached
            parent = h
        self._num_hashed[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (tail first, so its tail is evicted first); clear its table."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_list[block_id] = None
                if block.hash is None:          # holds nothing reusable: reuse it first
                    self.free_list.move_to_end(block_id, last=False)
        seq.block_ids = []
        self._num_hashed.pop(seq.seq_id, None)

    # -- internals ---------------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_list[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_list.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]         # evict from the prefix cache
        block.reset()
        block.ref_count = 1
        return block_id
