"""The scheduler (server/engine/native/scheduler.py) built directly, no model: the token budget,
admission, preemption, and `update_from_output` (append, fork, finish, free)."""

from __future__ import annotations

import pytest

from server.engine.native.scheduler import Scheduler
from server.engine.native.sequence import SeqStatus
from tests.engine.units import EOS, make_seq, manager, model_output, run_prefill, scheduler


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


def test_update_appends_commits_finishes_and_frees() -> None:
    s = scheduler()
    a, b = make_seq(0, list(range(10, 19))), make_seq(1, [3, 4, 5], max_tokens=1)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    seen = []
    finished = s.update_from_output(batch, model_output(batch, {0: [7], 1: [8]}),
                                    lambda seq, tok, lp, may_stop: seen.append((seq.seq_id, tok, may_stop)))
    assert seen == [(0, 7, True), (1, 8, True)]
    assert a.token_ids[-1] == 7 and a.output_ids == [7] and a.num_computed == 9 and a.finish_reason is None
    assert len(a.blocks.hashes) == 2  # its two full prompt blocks are in the prefix cache now
    assert finished == [b] and b.finish_reason == "length" and b.status is SeqStatus.FINISHED
    assert b.blocks.table == [] and s.running == [a] and b.state.num_seqs_left == 0
    s.abort_request(a.state)
    assert s.kv.pool.num_free == s.kv.pool.num_blocks


def test_update_forks_n_children_sharing_the_prompt_blocks() -> None:
    s = scheduler()
    parent = make_seq(0, list(range(10, 19)), n=3)
    s.add(parent)
    batch = s.schedule()
    s.update_from_output(batch, model_output(batch, {0: [7, 8, EOS]}), lambda *_: None)
    kids = parent.state.seqs
    assert [k.index for k in kids] == [0, 1, 2] and kids[0] is parent and not parent.needs_fork
    assert [k.output_ids for k in kids] == [[7], [8], [EOS]]
    assert kids[2].status is SeqStatus.FINISHED and s.running == kids[:2]  # the EOS one stopped
    assert kids[1].blocks.table == parent.blocks.table and kids[1].num_computed == 9
    assert all(s.kv.pool.blocks[b].ref_count == 2 for b in parent.blocks.table)
    assert parent.state.num_seqs_left == 2
    s.abort_request(parent.state)
    assert s.kv.pool.num_free == s.kv.pool.num_blocks


def test_stop_string_from_the_listener_finishes_in_the_same_step() -> None:
    s = scheduler()
    seq = make_seq(0, [3, 4], min_tokens=2)
    s.add(seq)
    listener = lambda _seq, _tok, _lp, may_stop: "stop!" if may_stop else None  # noqa: E731
    batch = s.schedule()
    assert s.update_from_output(batch, model_output(batch, {0: [9]}), listener) == []  # before min_tokens
    batch = s.schedule()
    assert s.update_from_output(batch, model_output(batch, {0: [9]}), listener) == [seq]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "stop!") and not s.running
