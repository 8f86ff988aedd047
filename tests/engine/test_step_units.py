"""The step's units built directly, no model: `check_stop`, `Scheduler.update_from_output`
(append, fork, finish, free) and the `OutputProcessor` (deltas, stop strings, stats)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.native.kv_cache import BlockPool, KVCacheManager
from server.engine.native.output_processor import OutputProcessor
from server.engine.native.outputs import ModelOutput, SchedulerOutput
from server.engine.native.scheduler import Scheduler
from server.engine.native.sequence import RequestState, Sequence, SeqStatus
from server.engine.native.stop import check_stop
from server.engine.request import EngineRequest, SamplingParams
from server.engine.stats import IterationStats
from tests.conftest import BUNDLED

BS = 4
EOS = 2


def make_seq(seq_id: int, prompt: list[int], output: list[int] = (), *, max_tokens: int = 8, **params) -> Sequence:
    req = EngineRequest(f"r{seq_id}", list(prompt), SamplingParams(max_tokens=max_tokens, **params))
    n = req.sampling_params.n
    state = RequestState(req, max_tokens=max_tokens, num_seqs_left=n, generators=[None] * n)
    seq = Sequence(seq_id, 0, state, list(prompt) + list(output), len(prompt), output_ids=list(output),
                   needs_fork=n > 1)
    state.seqs = [seq]
    return seq


def stop_of(seq: Sequence, token: int, **kw):
    """check_stop after appending `token`, as the scheduler does."""
    seq.token_ids.append(token)
    seq.output_ids.append(token)
    kw.setdefault("eos_token_ids", (EOS,))
    kw.setdefault("max_model_len", 64)
    return check_stop(seq, token, **kw)


# -- check_stop --------------------------------------------------------------------------------
def test_check_stop_each_reason() -> None:
    assert stop_of(make_seq(0, [5]), 7) is None
    assert stop_of(make_seq(0, [5]), EOS) == ("stop", None)
    assert stop_of(make_seq(0, [5], ignore_eos=True), EOS) is None
    assert stop_of(make_seq(0, [5], stop_token_ids=[7]), 7) == ("stop", 7)
    assert stop_of(make_seq(0, [5]), 7, stop_str="ab") == ("stop", "ab")
    assert stop_of(make_seq(0, [5], max_tokens=2), 7) is None
    assert stop_of(make_seq(0, [5], [7], max_tokens=2), 7) == ("length", None)  # the 2nd token
    assert stop_of(make_seq(0, [5] * 9), 7, max_model_len=10) == ("length", None)  # the context is full
    assert stop_of(make_seq(0, [5]), 7, grammar_end="stop") == ("stop", None)
    assert stop_of(make_seq(0, [5]), 7, grammar_end="error") == ("error", None)


def test_check_stop_precedence() -> None:
    """error > EOS > stop token > stop string > grammar end > length (the engine's order)."""
    full = {"max_tokens": 1, "stop_token_ids": [EOS, 7]}
    assert stop_of(make_seq(0, [5], **full), EOS, stop_str="x", grammar_end="error") == ("error", None)
    assert stop_of(make_seq(0, [5], **full), EOS, stop_str="x", grammar_end="stop") == ("stop", None)
    assert stop_of(make_seq(0, [5], **full), 7, stop_str="x", grammar_end="stop") == ("stop", 7)
    assert stop_of(make_seq(0, [5], max_tokens=1), 8, stop_str="x", grammar_end="stop") == ("stop", "x")


def test_check_stop_waits_for_min_tokens() -> None:
    """No EOS / stop-token stop before min_tokens; the context limit still applies."""
    seq = make_seq(0, [5], min_tokens=2, stop_token_ids=[7])
    assert stop_of(seq, EOS) is None and stop_of(seq, 7) == ("stop", 7)
    seq = make_seq(0, [5], min_tokens=3)
    assert stop_of(seq, EOS) is None and stop_of(seq, EOS) is None and stop_of(seq, EOS) == ("stop", None)
    assert stop_of(make_seq(0, [5] * 9, min_tokens=3), 9, max_model_len=10) == ("length", None)


# -- Scheduler.update_from_output ----------------------------------------------------------------
def scheduler(num_blocks: int = 32) -> Scheduler:
    return Scheduler(KVCacheManager(BlockPool(num_blocks, BS)), max_num_seqs=8, max_num_batched_tokens=64,
                     max_model_len=64, eos_token_ids=(EOS,))


def model_output(batch: SchedulerOutput, sampled: dict[int, list[int]]) -> ModelOutput:
    out = ModelOutput(None, [0] * (len(batch.scheduled) + 1))
    out.sampled_token_ids = sampled
    out.sampled_logprobs = {j: [None] * len(t) for j, t in sampled.items()}
    return out


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


# -- OutputProcessor -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED))


def test_output_processor_holds_back_and_cuts_at_a_stop_string(tok) -> None:
    proc = OutputProcessor(tok, num_moe_layers=1, num_experts=4, top_k=2, device_tokens=lambda c: {})
    ids = tok.encode("one two three four five", add_special_tokens=False)
    seq = make_seq(0, [1], stop=["three"], max_tokens=len(ids), include_stop_str_in_output=False)
    proc.add_request(seq.state.request_id)
    stats, finished_stats, text, stop_at = IterationStats(timestamp=0.0), [], "", None
    for k, token in enumerate(ids):
        seq.token_ids.append(token)
        seq.output_ids.append(token)
        found = proc.on_token(seq, token, None, True, now=float(k), stats=stats)
        ended = []
        if found is not None:  # the scheduler finishes it in the same step
            seq.finish_reason, seq.stop_reason, seq.status = "stop", found, SeqStatus.FINISHED
            seq.state.num_seqs_left -= 1
            ended = [seq]
        for out in proc.make_outputs([seq.state], ended, finished_stats):
            text += out.outputs[0].text
            assert "three" not in text  # never emitted past (or into) the stop string
            if out.finished:
                stop_at, metrics = k, out.metrics
        if found is not None:
            break
    assert text == "one two " and stop_at is not None and seq.stop_reason == "three"
    assert stats.num_generation_tokens == stop_at + 1 and len(stats.time_to_first_tokens) == 1
    assert len(finished_stats) == 1 and finished_stats[0].finish_reason == "stop"
    assert metrics.num_generation_tokens == stop_at + 1
    assert not proc.states  # forgotten once finished


def test_output_processor_first_output_carries_the_prompt_once(tok) -> None:
    proc = OutputProcessor(tok, num_moe_layers=1, num_experts=4, top_k=2, device_tokens=lambda c: {})
    seq = make_seq(0, [5, 6])
    proc.add_request(seq.state.request_id)
    stats = IterationStats(timestamp=0.0)
    outs = []
    for token in tok.encode("hello world", add_special_tokens=False):
        seq.token_ids.append(token)
        proc.on_token(seq, token, None, True, now=0.0, stats=stats)
        outs += proc.make_outputs([seq.state], [], [])
    assert outs[0].prompt_token_ids == [5, 6] and all(o.prompt_token_ids is None for o in outs[1:])
    assert not any(o.finished for o in outs)
    seq.finish_reason, seq.status, seq.state.num_seqs_left = "length", SeqStatus.FINISHED, 0
    last = proc.make_outputs([seq.state], [seq], [])
    assert last[0].finished and last[0].outputs[0].finish_reason == "length"
    assert "".join(o.outputs[0].text for o in outs + last) == "hello world"
    assert not proc.states  # forgotten once finished
