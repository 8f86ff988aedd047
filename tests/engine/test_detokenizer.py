"""The incremental detokenizer built directly: exact text, stop strings, bounded cost."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from server.engine.native.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from server.tokenization import token_bytes
from tests.conftest import BUNDLED


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(BUNDLED))


class SlowPath:
    """The bundled tokenizer seen as a non-byte-level one (no backend): the window path, with
    every decode call's length recorded."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.all_special_ids = tok.all_special_ids
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, i):
        return self._tok.convert_ids_to_tokens(i)

    def __len__(self) -> int:
        return len(self._tok)


def stream(detok: IncrementalDetokenizer, ids: list[int], min_tokens: int = 0) -> tuple[str, object]:
    text, stop = "", None
    for n, t in enumerate(ids, start=1):
        stop = detok.add_token(t, check_stop=n >= min_tokens)
        if stop is not None:
            return text + detok.flush(stopped_by_string=True), stop
        text += detok.delta()
    return text + detok.flush(), None


def test_byte_level_path_equals_decode_on_random_streams(tok) -> None:
    assert token_bytes(tok).exact
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            text, _ = stream(IncrementalDetokenizer(tok, [5, 6], [], skip_special_tokens=skip), ids)
            assert text == tok.decode(ids, skip_special_tokens=skip), ids


def test_multibyte_characters_split_across_tokens(tok) -> None:
    ids = tok.encode("naïve café 漢字 ok", add_special_tokens=False)
    for t in (tok, SlowPath(tok)):
        detok = IncrementalDetokenizer(t, [], [])
        pieces = []
        for i in ids:
            detok.add_token(i)
            pieces.append(detok.delta())
        assert "".join(pieces) + detok.flush() == "naïve café 漢字 ok"
        assert "\ufffd" not in "".join(pieces)  # a half character is never emitted


@pytest.mark.parametrize("slow", [False, True])
def test_invalid_utf8_costs_constant_work_per_token(tok, slow: bool) -> None:
    """4000 lone continuation bytes: the old window never advanced past the U+FFFD, decoding
    the whole output again for every token (quadratic)."""
    lone = next(i for i in range(len(tok)) if token_bytes(tok).bytes_of(i) == b"\xa1")
    t = SlowPath(tok) if slow else tok
    detok = IncrementalDetokenizer(t, [1, 2], [])
    text = ""
    for _ in range(4000):
        detok.add_token(lone)
        text += detok.delta()
    text += detok.flush()
    assert text == "\ufffd" * 4000
    if slow:
        assert max(t.decoded_lengths) <= 2 * MAX_PENDING_TOKENS + 6, max(t.decoded_lengths)


def test_stop_string_before_min_tokens_leaves_the_text_intact(tok) -> None:
    ids = tok.encode("The optional value is optional here", add_special_tokens=False)
    n_first = next(n for n in range(1, len(ids) + 1) if "optional" in tok.decode(ids[:n]))
    # min_tokens past the first "optional": it is kept, the second one stops the text
    text, stop = stream(IncrementalDetokenizer(tok, [], ["optional"]), ids, min_tokens=n_first + 1)
    assert stop == "optional" and text == "The optional value is "
    # no min_tokens: the first one stops it
    text, stop = stream(IncrementalDetokenizer(tok, [], ["optional"]), ids)
    assert stop == "optional" and text == "The "
    # min_tokens past both: nothing is cut
    text, stop = stream(IncrementalDetokenizer(tok, [], ["optional"]), ids, min_tokens=len(ids) + 1)
    assert stop is None and text == "The optional value is optional here"


def test_stop_string_across_token_boundaries_and_include(tok) -> None:
    ids = tok.encode("alpha beta gamma", add_special_tokens=False)
    text, stop = stream(IncrementalDetokenizer(tok, [], ["ta gam"]), ids)
    assert (text, stop) == ("alpha be", "ta gam")
    text, stop = stream(IncrementalDetokenizer(tok, [], ["ta gam"], include_stop_str_in_output=True), ids)
    assert text == "alpha beta gam"


def test_holdback_never_emits_past_a_stop(tok) -> None:
    ids = tok.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], ["three"])
    emitted = ""
    for i in ids:
        if detok.add_token(i) is not None:
            break
        emitted += detok.delta()
        assert "thr" not in emitted
    assert emitted + detok.flush(stopped_by_string=True) == "one two "
