"""Incremental detokenization with stop strings.

Text is decoded from a sliding window of tokens (prefix/read offsets, as in vLLM and TGI),
so each step costs O(new tokens), and a character split across tokens is held back until
it is complete. When stop strings are set, the last `len(longest stop) - 1` characters are
held back too, so no text past a stop string is ever emitted.
"""

from __future__ import annotations

from typing import Any

# tokens of context decoded before the new ones, so merges/spaces come out right
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text so far (truncated at a stop string)
        self.sent = 0  # characters of `text` already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if one now matches (text truncated)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        else:
            return None  # incomplete character: wait for more tokens
        start = len(self.text)
        self.text += new
        return self._check_stop(start)

    def _check_stop(self, new_start: int) -> str | None:
        for s in self.stop:
            # a match may begin up to len(s) - 1 characters before the new text
            idx = self.text.find(s, max(0, new_start - len(s) + 1))
            if idx != -1:
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                return s
        return None

    def flush(self, stopped_by_string: bool = False) -> str:
        """All text not yet emitted (call once the sequence has finished). Tokens still held
        back as an incomplete character are decoded as they are, unless a stop string ended
        the text."""
        if not stopped_by_string and self.read_offset < len(self.ids):
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
