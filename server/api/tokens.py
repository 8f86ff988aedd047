"""Token text for logprobs: each token id's exact bytes and its (lossy) text.

A token's bytes come from server/tokenization.py (for byte-level BPE tokenizers, GPT-2 style,
the exact bytes, so a token that holds half of a UTF-8 character still reports the right
`bytes`; other tokenizers fall back to `decode([id])`); its text is those bytes as UTF-8.
"""

from __future__ import annotations

import math
from typing import Any

from server.engine.request import Logprob
from server.tokenization import token_bytes

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports this instead


def clamp_logprob(x: float) -> float:
    return MIN_LOGPROB if (x is None or math.isnan(x) or x < MIN_LOGPROB) else float(x)


class TokenText:
    """id -> (text, bytes); cached per id (bounded by the vocabulary)."""

    def __init__(self, tokenizer: Any) -> None:
        self._bytes = token_bytes(tokenizer)  # shared with the engine's detokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes.bytes_of(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    # -- the two logprob formats ------------------------------------------------------------
    def chat_entry(self, lp: Logprob, num_top: int) -> dict[str, Any]:
        """One entry of chat `logprobs.content`."""
        text, raw = self.get(lp.token_id)
        top = []
        for tid, val in lp.top[:num_top]:
            t, b = self.get(tid)
            top.append({"token": t, "logprob": clamp_logprob(val), "bytes": b})
        return {"token": text, "logprob": clamp_logprob(lp.logprob), "bytes": raw, "top_logprobs": top}


class LegacyLogprobs:
    """Completions' legacy `logprobs` object, built incrementally (text offsets run on)."""

    def __init__(self, token_text: TokenText, num_top: int, offset: int = 0) -> None:
        self._tt = token_text
        self._num_top = num_top
        self.offset = offset

    def build(self, entries: list[Logprob | None], token_ids: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(token_ids, entries, strict=False):
            text = self._tt.text(tid)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if lp is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(clamp_logprob(lp.logprob))
            top: dict[str, float] = {}
            for t, v in lp.top[: self._num_top]:
                top.setdefault(self._tt.text(t), clamp_logprob(v))
            top.setdefault(text, clamp_logprob(lp.logprob))
            out["top_logprobs"].append(top)
        return out


def prompt_logprobs_json(token_text: TokenText, entries: list[Logprob | None] | None,
                         num_top: int) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token None or {token_id: {logprob, decoded_token}}."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        d = {str(lp.token_id): {"logprob": clamp_logprob(lp.logprob), "decoded_token": token_text.text(lp.token_id)}}
        for rank, (tid, val) in enumerate(lp.top[:num_top], start=1):
            d.setdefault(str(tid), {"logprob": clamp_logprob(val), "rank": rank,
                                    "decoded_token": token_text.text(tid)})
        out.append(d)
    return out
