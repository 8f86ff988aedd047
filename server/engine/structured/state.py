"""Per-sequence grammar state: an xgrammar matcher advanced with every accepted token.

A state may wait behind a *gate*: with a reasoning parser the constraint applies only after
the reasoning part, so the matcher starts once the output ends with the gate's token ids
(e.g. `</think>`); until then the sequence samples freely.

`accept()` tells the engine when the structure is done:
- the matcher accepted a stop token (the mask allowed only stop tokens, the model took one);
- or the accepted text completes the grammar and nothing but a stop token may follow, so the
  sequence ends at once without spending a step on the stop token.
"""

from __future__ import annotations

import logging

import torch
import xgrammar as xgr

from server.engine.structured.backend import CompiledStructure

log = logging.getLogger(__name__)


class GrammarState:
    __slots__ = ("active", "failed", "matcher", "structure", "_stop_words")

    def __init__(self, structure: CompiledStructure, matcher: xgr.GrammarMatcher | None = None,
                 active: bool | None = None):
        self.structure = structure
        self.matcher = matcher if matcher is not None else xgr.GrammarMatcher(structure.grammar)
        self.active = not structure.gate if active is None else active
        self.failed = False
        self._stop_words: torch.Tensor | None = None

    def fork(self) -> GrammarState:
        """An independent copy in the same state (parallel sampling, n > 1)."""
        return GrammarState(self.structure, self.matcher.fork(), self.active)

    def accept(self, token: int, output_ids: list[int]) -> str | None:
        """Advance with the token just appended to `output_ids`. Returns "stop" when the
        structure is complete, "error" if the matcher rejected the token, else None."""
        if not self.active:
            gate = self.structure.gate
            if len(output_ids) >= len(gate) and tuple(output_ids[-len(gate):]) == gate:
                self.active = True
            return None
        if not self.matcher.accept_token(token):
            self.failed = True
            log.error("grammar matcher rejected token %d (spec %s); ending the sequence", token,
                      self.structure.spec.describe())
            return "error"
        if self.matcher.is_terminated():
            return "stop"
        if self.matcher.is_completed() and self._only_stop_allowed():
            return "stop"
        return None

    def _only_stop_allowed(self) -> bool:
        """Whether the next mask allows nothing but stop tokens (one row filled, [words])."""
        words = (self.structure.vocab_size + 31) // 32
        row = torch.empty(1, words, dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(row, 0)
        if self._stop_words is None:
            stop = torch.zeros(words, dtype=torch.int32)
            for t in self.structure.stop_token_ids:
                if 0 <= t < self.structure.vocab_size:
                    stop[t // 32] |= _bit(t % 32)
            self._stop_words = stop
        return bool(((row[0] & ~self._stop_words) == 0).all())


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a Python int that fits int32 (bit 31 is the sign)."""
    return -(1 << 31) if i == 31 else 1 << i
