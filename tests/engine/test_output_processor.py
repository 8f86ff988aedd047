"""The OutputProcessor (server/engine/native/output_processor.py) built directly, no model:
deltas, stop strings held back and cut, the prompt sent once."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.native.output_processor import OutputProcessor
from server.engine.native.sequence import SeqStatus
from server.engine.stats import IterationStats
from tests.conftest import BUNDLED
from tests.engine.units import make_seq


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
