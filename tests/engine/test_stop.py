"""`check_stop` (server/engine/native/stop.py): every reason and their precedence."""

from __future__ import annotations

from tests.engine.units import EOS, make_seq, stop_of


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
