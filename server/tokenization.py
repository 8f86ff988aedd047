"""Exact bytes of each token, shared by the engine's detokenizer and the API's logprob text.

For byte-level BPE tokenizers (GPT-2 style: Qwen, Llama 3, DeepSeek, the bundled checkpoint)
a token's string maps back to its exact bytes through GPT-2's byte-to-unicode table, so a
token that holds half of a UTF-8 character still has well-defined bytes, and a stream of
tokens can be decoded incrementally with a UTF-8 decoder: linear time, and the same text as
`tokenizer.decode(ids)` (checked on a sample when the table is built). Other tokenizers
(sentencepiece, WordPiece) report no bytes and are decoded through `tokenizer.decode`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table (a constant, computed once)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return getattr(backend, "decoder", None)


class TokenBytes:
    """id -> exact bytes for byte-level tokenizers (cached per id, bounded by the vocabulary).

    `exact` says whether concatenating token bytes and decoding them as UTF-8 reproduces
    `tokenizer.decode(ids, skip_special_tokens=...)` (byte-level decoder, no clean-up of
    tokenization spaces). `bytes_of` works for every tokenizer (falling back to the UTF-8 of
    `decode([id])`), which is what logprob `bytes` fields report.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", []) or [])
        decoder = _decoder(tokenizer)
        # ByteLevel, alone or in a Sequence of decoders: its tokens' strings map back to bytes
        self.byte_level = decoder is not None and "ByteLevel" in repr(decoder)
        self.exact = (type(decoder).__name__ == "ByteLevel"
                      and not getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._cache: dict[int, bytes] = {}
        if self.exact:
            self.exact = self._self_check()

    def bytes_of(self, token_id: int) -> bytes:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> bytes:
        if self.byte_level and token_id not in self.special_ids:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = byte_decoder()
            if isinstance(piece, str) and all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def _self_check(self) -> bool:
        """A few ids decoded both ways must agree, else fall back to the tokenizer's decode."""
        vocab = len(self.tokenizer)
        sample = sorted({0, 1, vocab // 3, vocab // 2, vocab - 1, *list(self.special_ids)[:4]})
        sample = [i for i in sample if 0 <= i < vocab]
        joined = b"".join(self.bytes_of(i) for i in sample).decode("utf-8", errors="replace")
        return joined == self.tokenizer.decode(sample, skip_special_tokens=False)


@lru_cache(maxsize=8)
def token_bytes(tokenizer: Any) -> TokenBytes:
    """One shared table per tokenizer object."""
    return TokenBytes(tokenizer)
