"""The KV-cache manager (server/engine/native/kv_cache.py) built directly, as vLLM's tests/v1/core
do, no model: the prefix cache, hash collisions, copy-on-write, eviction."""

from __future__ import annotations

from server.engine.native import kv_cache
from server.engine.native.kv_cache import SequenceBlocks
from tests.engine.units import make_seq, manager, run_prefill


def test_prefix_hit_shares_blocks_and_counts_references() -> None:
    kv = manager(16)
    a = make_seq(0, list(range(10, 23)))  # 13 tokens: 3 full blocks + 1
    run_prefill(kv, a)
    b = SequenceBlocks()
    hit = kv.match_prefix(b, list(range(10, 23)) + [99])
    assert hit == 12 and b.table == a.blocks.table[:3]
    assert [kv.pool.blocks[i].ref_count for i in b.table] == [2, 2, 2]
    kv.free(a.blocks)
    assert [kv.pool.blocks[i].ref_count for i in b.table] == [1, 1, 1]
    kv.free(b)
    assert kv.pool.num_free == 16


def test_at_least_one_token_is_always_computed() -> None:
    kv = manager(16)
    a = make_seq(0, list(range(8)))  # exactly two full blocks
    run_prefill(kv, a)
    b = SequenceBlocks()
    assert kv.match_prefix(b, list(range(8))) == 4  # the last block stays uncached: a token to sample from
    kv.free(a.blocks)
    kv.free(b)


def test_hash_collision_is_never_a_hit(monkeypatch) -> None:
    """Every block hashes alike: a lookup must still verify tokens and parent, not trust the hash."""
    monkeypatch.setattr(kv_cache, "hash_block", lambda parent, tokens: 42)
    kv = manager(16)
    a = make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(kv, a)
    other = SequenceBlocks()
    assert kv.match_prefix(other, [9, 9, 9, 9, 5, 6, 7, 8, 1]) == 0  # same hash, other tokens
    assert kv.match_prefix(other, [1, 2, 3, 4, 9]) == 4  # same tokens: a real hit
    kv.free(other)
    kv.free(a.blocks)


def test_collision_in_the_parent_chain_is_not_a_hit() -> None:
    """Block 2 holds the same tokens under another prefix: reaching it needs its own parent."""
    kv = manager(16)
    a = make_seq(0, [1, 1, 1, 1, 7, 7, 7, 7, 0])
    run_prefill(kv, a)
    # forge a cache entry: b's second block hashed as if its parent were a's first block
    b = make_seq(1, [2, 2, 2, 2, 7, 7, 7, 7, 0])
    run_prefill(kv, b)
    h_a1 = a.blocks.hashes[0]
    forged = kv_cache.hash_block(h_a1, (7, 7, 7, 7))
    assert kv.pool.cached[forged] == a.blocks.table[1]
    kv.pool.cached[forged] = b.blocks.table[1]  # what a colliding hash would do
    c = SequenceBlocks()
    assert kv.match_prefix(c, [1, 1, 1, 1, 7, 7, 7, 7, 5]) == 4  # block 1 matches, block 2 is refused
    for blocks in (c, a.blocks, b.blocks):
        kv.free(blocks)


def test_copy_on_write_of_a_shared_partial_block() -> None:
    kv = manager(8)
    a = make_seq(0, [1, 2, 3, 4, 5, 6])
    run_prefill(kv, a)
    child = kv.fork(a.blocks)
    copies: list[tuple[int, int]] = []
    assert kv.allocate(child, 6, 1, copies)  # writes into the shared half-full block
    assert copies == [(a.blocks.table[1], child.table[1])] and child.table[0] == a.blocks.table[0]
    kv.free(child)
    kv.free(a.blocks)
    assert kv.pool.num_free == 8


def test_lru_eviction_keeps_the_prefix_longest() -> None:
    kv = manager(4)
    a = make_seq(0, list(range(12)) + [50])
    run_prefill(kv, a)  # 4 blocks, the first 3 full and cached
    kv.free(a.blocks)  # tail first into the free queue
    b = SequenceBlocks()
    assert kv.allocate(b, 0, 4, [])  # takes the least recently freed block: a's uncached tail
    c = SequenceBlocks()
    assert kv.match_prefix(c, list(range(12)) + [50]) == 12
    kv.free(b)
    kv.free(c)


def test_blocks_out_of_reach_are_released_and_forks_and_frees_skip_them():
    """`reach` (every layer windowed): commit releases the blocks before the next query's first
    visible key, keeping the last full one (the next block's parent in the prefix cache)."""
    pool = kv_cache.BlockPool(16, 4)
    kv = kv_cache.KVCacheManager(pool, reach=6)
    seq = SequenceBlocks()
    tokens = list(range(30))
    assert kv.allocate(seq, 0, 14, [])
    kv.commit(seq, tokens, 14)  # the next query (position 14) sees 9..14: blocks 0 and 1 are out
    assert seq.dropped == 2 and pool.num_free == 16 - 2
    assert kv.allocate(seq, 14, 10, [])
    kv.commit(seq, tokens, 24)  # sees 19..24: blocks 0..3 out, block 4 (16..19) kept
    assert seq.dropped == 4 and pool.num_free == 16 - 2
    child = kv.fork(seq)
    assert child.dropped == 4 and all(pool.blocks[b].ref_count == 2 for b in seq.table[4:])
    kv.free(child)
    kv.free(seq)
    assert pool.num_free == 16 and seq.dropped == 0 and all(b.ref_count == 0 for b in pool.blocks)
    # the released blocks stay in the prefix cache: a new sequence with the same tokens hits them
    again = SequenceBlocks()
    assert kv.match_prefix(again, tokens[:25]) == 24
    kv.free(again)
