"""Pure pieces of the API layer: token bytes for logprobs, auth, error shaping."""

from __future__ import annotations

from pydantic import ValidationError

from server.api.auth import bearer_ok, is_exempt
from server.api.errors import truncate, validation_error
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.tokens import LegacyLogprobs, TokenText, clamp_logprob
from server.engine.request import Logprob
from tests.server._fake_engine import make_tokenizer


def test_token_bytes_reassemble_any_text() -> None:
    tok = make_tokenizer()
    tt = TokenText(tok)
    for text in ("hello world", "héllo wörld", "你好 😀 — ok", "\n\t \x00"):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(bytes(tt.get(i)[1]) for i in ids) == text.encode("utf-8")
    eos = tok.eos_token_id
    assert tt.get(eos) == ("</s>", list(b"</s>"))


def test_legacy_logprobs_offsets_and_top() -> None:
    tok = make_tokenizer()
    ids = tok.encode("hello world", add_special_tokens=False)
    lps = [None] + [Logprob(t, -0.25, [(t, -0.25), (3, -2.0)]) for t in ids[1:]]
    out = LegacyLogprobs(TokenText(tok), 2).build(lps, ids)
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert "".join(out["tokens"]) == "hello world"
    assert out["text_offset"] == [sum(len(t) for t in out["tokens"][:k]) for k in range(len(ids))]
    assert clamp_logprob(float("-inf")) == -9999.0


def test_auth() -> None:
    assert bearer_ok(b"Bearer k1", "k1") and bearer_ok(b"bearer  k1", "k1")
    assert not bearer_ok(None, "k1") and not bearer_ok(b"Bearer k2", "k1") and not bearer_ok(b"k1", "k1")
    assert not bearer_ok(b"Basic k1", "k1")
    assert is_exempt("/health", ("/health",)) and not is_exempt("/healthz", ("/health",))
    assert is_exempt("/debug/x", ("/debug/",)) and is_exempt("/debug/x", ("/debug*",))


def _err(model, raw: str):
    try:
        model.model_validate_json(raw, strict=True)
    except ValidationError as e:
        return validation_error(e.errors(include_url=False, include_input=False))
    raise AssertionError("valid")


def test_validation_messages_are_short_and_name_the_field() -> None:
    e = _err(CompletionRequest, '{"prompt": 5}')
    assert e.param == "prompt" and "list of token ids" in e.message
    e = _err(ChatCompletionRequest, '{"messages": [{"role": "user", "content": 5}]}')
    assert e.param == "messages[0].content"
    e = _err(CompletionRequest, '{"prompt": "x", "max_tokens": "1", "n": "2"}')
    assert e.param == "max_tokens" and "1 more" in e.message
    e = _err(CompletionRequest, '{"prompt": "x", "' + "k" * 5000 + '": 1}')
    assert len(e.message) < 200 and e.status == 400
    assert _err(CompletionRequest, "[]").message == "The request body must be a JSON object."
    assert truncate("x" * 100, 10) == "x" * 7 + "..."
