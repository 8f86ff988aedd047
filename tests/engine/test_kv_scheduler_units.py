"""The KV-cache manager and the scheduler built directly (as vLLM's tests/v1/core do), no model."""

from __future__ import annotations

import pytest

from server.engine.native import kv_cache
from server.engine.native.kv_cache import BlockPool, KVCacheManager, SequenceBlocks
from server.engine.native.scheduler import Scheduler
from server.engine.native.sequence import RequestState, Sequence, SeqStatus
from server.engine.request import EngineRequest, SamplingParams

BS = 4


def make_seq(seq_id: int, tokens: list[int], arrival: float = 0.0, **params) -> Sequence:
    params.setdefault("max_tokens", 8)
    req = EngineRequest(f"r{seq_id}", list(tokens), SamplingParams(**params), arrival_time=arrival)
    state = RequestState(req, max_tokens=params["max_tokens"], num_seqs_left=1)
    return Sequence(seq_id, 0, state, list(tokens), len(tokens))


def manager(num_blocks: int, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, BS, caching))


def run_prefill(kv: KVCacheManager, seq: Sequence) -> None:
    """As the engine does after a step computed the whole prompt: commit the full blocks."""
    assert kv.allocate(seq.blocks, 0, len(seq.token_ids), [])
    seq.num_computed = len(seq.token_ids)
    kv.commit(seq.blocks, seq.token_ids, seq.num_computed)


# -- prefix cache ----------------------------------------------------------------------------
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


# -- scheduler -------------------------------------------------------------------------------
def test_budget_is_shared_decodes_first_then_prefill_chunks() -> None:
    kv = manager(64)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10, max_model_len=64)
    running = make_seq(0, [1, 2, 3])
    s.add(running)
    out = s.schedule()
    running.num_computed = 3
    running.token_ids.append(9)  # it sampled one token
    long = make_seq(1, list(range(20)), arrival=1.0)
    s.add(long)
    out = s.schedule()
    assert [(x.seq.seq_id, x.num_new) for x in out.scheduled] == [(0, 1), (1, 9)]  # a 9-token chunk
    for x in out.scheduled:
        kv.free(x.seq.blocks)


def test_waiting_sequence_holds_no_blocks_when_it_cannot_be_admitted() -> None:
    """The KV-pressure deadlock: a waiting sequence that matched cached prefix blocks but cannot
    get the rest must give the prefix blocks back, or the running sequence starves."""
    kv = manager(6)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    warm = make_seq(0, list(range(100, 113)))  # 13 tokens: 3 full cached blocks
    run_prefill(kv, warm)
    kv.free(warm.blocks)  # cached, free
    running = make_seq(1, [7, 7, 7])
    s.add(running)
    assert s.schedule().scheduled  # admitted: 1 block
    running.num_computed = 3
    # needs the 3 cached blocks plus 3 more: only 2 are free beyond the cached ones
    waiting = make_seq(2, list(range(100, 113)) + list(range(200, 210)), arrival=1.0)
    s.add(waiting)
    out = s.schedule()
    assert [x.seq.seq_id for x in out.scheduled] == [1]
    assert waiting.status is SeqStatus.WAITING
    assert waiting.blocks.table == [] and waiting.num_computed == 0, "a waiting sequence holds blocks"
    assert kv.pool.num_free == 5  # everything but the running sequence's block is free again
    kv.free(running.blocks)


def test_preemption_frees_the_latest_arrival_and_requeues_it_first() -> None:
    kv = manager(3)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    old, new = make_seq(0, [1, 2, 3, 4]), make_seq(1, [5, 6, 7, 8], arrival=1.0)
    for seq in (old, new):
        s.add(seq)
    s.schedule()
    for seq in (old, new):
        seq.num_computed = 4
        seq.token_ids.append(0)  # both need a second block now: only one is free
    out = s.schedule()
    assert out.num_preemptions == 1 and [x.seq.seq_id for x in out.scheduled] == [0]
    assert new.status is SeqStatus.WAITING and new.num_computed == 0 and s.waiting[0] is new
    kv.free(old.blocks)


@pytest.mark.parametrize("chunked", [True, False])
def test_prompt_outputs_skip_the_prefix_cache(chunked: bool) -> None:
    """prompt_logprobs / prompt routing need every prompt position computed: no prefix hit."""
    kv = manager(32)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, chunked_prefill=chunked)
    run_prefill(kv, make_seq(9, list(range(30, 47))))
    plain, wants = make_seq(0, list(range(30, 47))), make_seq(1, list(range(30, 47)), prompt_logprobs=1)
    s.add(plain)
    s.add(wants)
    out = {x.seq.seq_id: x.num_new for x in s.schedule().scheduled}
    assert out == {0: 1, 1: 17}


def test_admission_counts_the_fan_out_of_n_against_max_num_seqs() -> None:
    kv = manager(64)
    s = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    first = make_seq(0, [1, 2, 3])
    s.add(first)
    s.schedule()
    first.num_computed = 3
    first.token_ids.append(9)
    forking = make_seq(1, [4, 5, 6], arrival=1.0, n=2, temperature=1.0)
    forking.needs_fork = True  # becomes 2 sequences: 1 running + 2 > max_num_seqs
    s.add(forking)
    assert [x.seq.seq_id for x in s.schedule().scheduled] == [0] and s.waiting == [forking]
    s.waiting.clear()
    plain = make_seq(2, [4, 5, 6], arrival=2.0)
    s.add(plain)
    assert [x.seq.seq_id for x in s.schedule().scheduled] == [0, 2]
    for seq in (first, plain):
        kv.free(seq.blocks)


def test_without_chunked_prefill_a_prompt_waits_for_the_whole_budget() -> None:
    kv = manager(64)
    s = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10, max_model_len=64, chunked_prefill=False)
    running = make_seq(0, [1, 2, 3])
    s.add(running)
    s.schedule()
    running.num_computed = 3
    running.token_ids.append(9)
    long = make_seq(1, list(range(10)), arrival=1.0)  # 10 tokens: 9 are left after the decode
    s.add(long)
    out = s.schedule()
    assert [(x.seq.seq_id, x.num_new) for x in out.scheduled] == [(0, 1)]
    assert long.status is SeqStatus.WAITING and long.blocks.table == []
    running.num_computed = 4
    s.running.clear()  # the decode finished: the whole budget is free
    assert [(x.seq.seq_id, x.num_new) for x in s.schedule().scheduled] == [(1, 10)]
    kv.free(running.blocks)
    kv.free(long.blocks)
