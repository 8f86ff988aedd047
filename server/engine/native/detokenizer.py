"""Incremental detokenization with stop strings, linear in the output length.

Two ways to turn tokens into text as they arrive:
- byte-level tokenizers (`TokenBytes.exact`): each token's exact bytes go through an
  incremental UTF-8 decoder, which holds back an incomplete character and replaces invalid
  bytes at once, so the text equals `tokenizer.decode(ids)` and each token costs O(1);
- other tokenizers: a sliding window of tokens (prefix/read offsets, as in vLLM and TGI)
  decoded with the tokenizer; a character split across tokens is held back until complete,
  but at most `MAX_PENDING_TOKENS` tokens (a UTF-8 character is at most 4 bytes, i.e. 4
  byte-fallback tokens): past that the bytes are invalid for good and go out as U+FFFD, so
  the window, and each token's cost, stays bounded.

Stop strings are looked for only once `min_tokens` tokens were generated (vLLM semantics):
text before that is never cut. When stop strings are set, the last `len(longest stop) - 1`
characters are held back, so no text past a stop string is ever emitted.
"""

from __future__ import annotations

import codecs
from typing import Any

from server.tokenization import token_bytes

# tokens of prompt context decoded before the new ones, so merges/spaces come out right
_CONTEXT = 5
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        table = token_bytes(tokenizer)
        self._bytes = table if table.exact else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self._bytes else None
        self.ids: list[int] = [] if self._bytes else list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text so far (truncated at a stop string)
        self.sent = 0  # characters of `text` already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string if one now matches (text truncated).
        `check_stop=False` (before `min_tokens`) appends without looking for stop strings."""
        start = len(self.text)
        self.text += self._new_text(token_id)
        if not check_stop or len(self.text) == start:
            return None
        return self._check_stop(start)

    def _new_text(self, token_id: int) -> str:
        if self._bytes is not None:
            if self.skip_special and token_id in self._bytes.special_ids:
                return ""
            return self._utf8.decode(self._bytes.bytes_of(token_id))
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix):
            return ""
        if full.endswith("\ufffd") and len(self.ids) - self.read_offset < MAX_PENDING_TOKENS:
            return ""  # maybe an incomplete character: wait for more tokens
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _check_stop(self, new_start: int) -> str | None:
        for s in self.stop:
            # a match may begin up to len(s) - 1 characters before the new text
            idx = self.text.find(s, max(0, new_start - len(s) + 1))
            if idx != -1:
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                return s
        return None

    def flush(self, stopped_by_string: bool = False) -> str:
        """All text not yet emitted (call once the sequence has finished). Bytes or tokens still
        held back as an incomplete character are decoded as they are, unless a stop string
        ended the text."""
        if not stopped_by_string:
            if self._utf8 is not None:
                self.text += self._utf8.decode(b"", final=True)
            elif self.read_offset < len(self.ids):
                prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
                full = self._decode(self.ids[self.prefix_offset :])
                self.text += full[len(prefix) :]
                self.read_offset = len(self.ids)
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out

    def delta(self) -> str:
        """Text safe to emit now (held back: a possible stop-string prefix)."""
        safe = len(self.text) - self.holdback if self.stop else len(self.text)
        if safe <= self.sent:
            return ""
        out = self.text[self.sent : safe]
        self.sent = safe
        return out
