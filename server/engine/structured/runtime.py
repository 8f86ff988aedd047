"""The native engine's structured-output runtime: the few calls `EngineCore` makes.

Per step:
1. `begin_step(seqs)` (after scheduling, before the forward): the masks of the sequences that
   sample this step are submitted to the fill thread, so they are computed while the model
   runs (SGLang's / xgrammar's overlap);
2. `mask(states)` (before sampling): waits for that fill and returns the rows to constrain and
   their bitmask for the sampler (rows without a grammar, or still in their reasoning part,
   are not in it and stay untouched);
3. `accept(state, token, output_ids)` (for every appended token): advances the matcher and
   says when the structure is complete.

Nothing here compiles: grammars arrive compiled in `EngineRequest.structured`.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # xgrammar is imported with the first structured request, not with the engine
    from server.engine.structured.mask import MaskFiller
    from server.engine.structured.state import GrammarState

log = logging.getLogger(__name__)


class StructuredRuntime:
    def __init__(self, vocab_size: int, overlap: bool = True):
        self.vocab_size = vocab_size
        self.overlap = overlap
        self._filler: MaskFiller | None = None  # made on the first structured request
        self._pending: Future | None = None
        self._pending_rows: dict[int, int] = {}  # id(state) -> row of the pending bitmask

    @property
    def filler(self) -> MaskFiller:
        if self._filler is None:
            from server.engine.structured.mask import MaskFiller

            self._filler = MaskFiller(self.vocab_size, overlap=self.overlap)
        return self._filler

    def new_state(self, structure: Any) -> GrammarState | None:
        """The grammar state of a new sequence (None for unconstrained requests)."""
        if structure is None:
            return None
        if structure.vocab_size != self.vocab_size:
            raise ValueError(f"grammar compiled for vocabulary {structure.vocab_size}, the model has "
                             f"{self.vocab_size}")
        from server.engine.structured.state import GrammarState

        return GrammarState(structure)

    @staticmethod
    def fork(state: GrammarState | None) -> GrammarState | None:
        return None if state is None else state.fork()

    def begin_step(self, states: list[GrammarState | None]) -> None:
        """Start filling the masks of this step's sampling sequences (those with an active grammar)."""
        self._wait_pending()
        live = [s for s in states if s is not None and s.active and not s.failed]
        if not live:
            return
        self._pending_rows = {id(s): i for i, s in enumerate(live)}
        self._pending = self.filler.submit(live)

    def mask(self, states: list[GrammarState | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row indices [m], bitmask [m, words]) for the sampler, rows in `states` order; None
        when no row is constrained. States not filled by `begin_step` (children forked this
        step) are filled now."""
        rows = [i for i, s in enumerate(states) if s is not None and s.active and not s.failed]
        if not rows:
            self._wait_pending()
            return None
        filled = self._wait_pending()
        missing = [states[i] for i in rows if filled is None or id(states[i]) not in self._pending_rows]
        extra = self.filler.fill(missing) if missing else None
        parts, k = [], 0
        for i in rows:
            pos = self._pending_rows.get(id(states[i])) if filled is not None else None
            if pos is not None:
                parts.append(filled[pos])
            else:
                parts.append(extra[k])
                k += 1
        self._pending_rows = {}
        return torch.tensor(rows, dtype=torch.long), torch.stack(parts)

    def _wait_pending(self) -> torch.Tensor | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.result()  # the fill's own exception, if any, fails this step

    @staticmethod
    def accept(state: GrammarState | None, token: int, output_ids: list[int]) -> str | None:
        return None if state is None else state.accept(token, output_ids)

    @staticmethod
    def complete(state: GrammarState | None) -> bool:
        """Whether a constrained sequence's output so far is a complete structure."""
        return state is not None and state.active and state.matcher.is_completed()

    def close(self) -> None:
        self._wait_pending_quietly()
        if self._filler is not None:
            self._filler.close()

    def _wait_pending_quietly(self) -> None:
        try:
            self._wait_pending()
        except Exception:  # noqa: BLE001 - shutting down
            log.debug("pending mask fill failed at shutdown", exc_info=True)
