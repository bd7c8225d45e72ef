"""Tests for BlockManager: ref counts, freeing, prefix reuse, LRU eviction."""
import random

from shardserve.core.block_manager import BlockManager
from shardserve.core.sequence import Sequence
from shardserve.sampling_params import SamplingParams

_ids = iter(range(10**9))


def make(prompt) -> Sequence:
    i = next(_ids)
    return Sequence(seq_id=f"s{i}", request_id=f"r{i}", index=0, prompt_token_ids=list(prompt),
                    sampling_params=SamplingParams(), seed=0, arrival_time=float(i))


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Allocate the whole prompt and pretend its KV was computed."""
    assert bm.allocate(seq, seq.num_tokens - bm.match_prefix(seq.all_token_ids)[1])
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)


def check(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        for b in seq.block_ids:
            refs[b] += 1
    for block in bm.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == refs[block.block_id]
        assert (block.ref_count == 0) == (block.block_id in bm.free_list)
        if block.ref_count > 1:
            assert block.hash is not None          # sharing only through the prefix cache
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].hash == h


def test_blocks_needed_and_idle():
    bm = BlockManager(10, 16)
    assert [bm.blocks_needed(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    assert bm.num_free_blocks == bm.num_blocks == 10 and bm.usage == 0.0 and bm.block_size == 16


def test_allocate_grow_and_free():
    bm = BlockManager(4, 16)
    seq = make(range(20))
    assert bm.allocate(seq, 20) and len(seq.block_ids) == 2
    assert bm.usage == 0.5
    seq.num_computed_tokens = 20
    assert bm.allocate(seq, 12) and len(seq.block_ids) == 2      # 32 tokens still fit in 2 blocks
    assert bm.allocate(seq, 13) and len(seq.block_ids) == 3
    other = make(range(100, 140))
    assert not bm.allocate(other, 40)                             # all-or-nothing
    assert other.block_ids == [] and bm.num_free_blocks == 1
    check(bm, [seq])
    bm.free(seq)
    assert seq.block_ids == [] and bm.num_free_blocks == 4 and bm.usage == 0.0
    check(bm, [])


def test_shared_prefix_40_tokens():
    bm = BlockManager(16, 16)
    prompt = list(range(1000, 1040))
    a, b = make(prompt), make(prompt)
    run_prefill(bm, a)
    assert bm.match_prefix(prompt) == (a.block_ids[:2], 32)
    assert bm.allocate(b, 8)
    assert b.num_computed_tokens == b.num_cached_prompt_tokens == 32
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert bm.num_free_blocks == 16 - 4
    check(bm, [a, b])
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.usage == 0.0
    check(bm, [])
    # freed blocks stay findable until evicted
    c = make(prompt)
    assert bm.match_prefix(prompt)[1] == 32
    assert bm.allocate(c, 8) and c.num_computed_tokens == 32


def test_hit_never_covers_whole_prompt():
    bm = BlockManager(8, 16)
    prompt = list(range(32))
    run_prefill(bm, make(prompt))
    assert bm.match_prefix(prompt) == (bm.match_prefix(prompt)[0], 16)   # 32 tokens: only 1 block reusable
    assert bm.match_prefix(prompt + [5])[1] == 32
    assert bm.match_prefix(prompt[:16])[1] == 0
    assert bm.match_prefix([99] + prompt[1:])[1] == 0                  # different first block: no hit


def test_prefix_caching_disabled():
    bm = BlockManager(8, 16, enable_prefix_caching=False)
    prompt = list(range(40))
    run_prefill(bm, make(prompt))
    assert bm.match_prefix(prompt) == ([], 0)
    assert not bm.hash_to_block


def test_eviction_when_free_list_exhausted():
    bm = BlockManager(4, 16)
    a = make(range(33))                     # 3 blocks, 2 full -> cached
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.hash_to_block) == 2
    b = make(range(500, 564))               # 4 blocks: must evict both cached blocks
    assert bm.allocate(b, 64)
    assert not bm.hash_to_block and bm.match_prefix(list(range(33)))[1] == 0
    check(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 4


def test_uncached_blocks_reused_before_cached():
    bm = BlockManager(4, 16)
    a = make(range(20))                     # block 0 full (cached), block 1 partial (not cached)
    run_prefill(bm, a)
    bm.free(a)
    b = make(range(700, 710))               # needs 1 block: must not evict the cached one
    assert bm.allocate(b, 10)
    assert bm.match_prefix(list(range(20)))[1] == 16


def test_decode_growth_registers_blocks():
    bm = BlockManager(8, 4)
    seq = make([1, 2, 3])
    run_prefill(bm, seq)
    for t in range(10):
        seq.append_token(t)
        assert bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        bm.mark_computed(seq)
    # 13 tokens -> 3 full blocks cached, the chain matches a fresh copy
    other = make(seq.all_token_ids + [42])
    assert bm.match_prefix(other.all_token_ids) == (seq.block_ids[:3], 12)


def test_random_invariants():
    rng = random.Random(0)
    bm = BlockManager(12, 4)
    live: list[Sequence] = []
    prefixes = [[rng.randrange(5) for _ in range(8)] for _ in range(3)]
    for _ in range(500):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq = make(rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(1, 10))])
            hit = bm.match_prefix(seq.all_token_ids)[1]
            assert hit < seq.num_tokens
            if bm.allocate(seq, seq.num_tokens - hit):
                seq.num_computed_tokens = seq.num_tokens
                bm.mark_computed(seq)
                live.append(seq)
            else:
                assert seq.block_ids == [] and seq.num_computed_tokens == 0
        check(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
