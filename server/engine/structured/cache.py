"""Compiled grammars, kept per normalised spec (LRU), bounded by bytes: a schema is compiled once
however many requests use it. Failures are kept too (an invalid spec, one past the time or
size budget), so a refused spec sent again is refused at once.

An entry weighs its compiled grammar's memory (xgrammar's `memory_size_bytes`) plus its key
(the spec's text, up to 256 KiB); the least recently used entries go when the total passes
`max_bytes`. One grammar over `max_bytes` is never kept (the compile pool refuses grammars
over its own, smaller, per-grammar limit first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from server.engine.structured.backend import CompiledStructure, GrammarError
from server.engine.structured.spec import StructuredSpec

DEFAULT_MAX_BYTES = 512 * 2**20
ERROR_BYTES = 1024  # what a kept failure weighs besides its key


class GrammarCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[CompiledStructure | GrammarError, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def lookup(self, spec: StructuredSpec) -> CompiledStructure | None:
        """The kept grammar for `spec` (for spec's own field), None if none is kept; a kept
        failure is raised again as a GrammarError naming spec.param."""
        with self._lock:
            entry = self._items.get(spec.key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(spec.key)
            self.hits += 1
        item = entry[0]
        if isinstance(item, GrammarError):
            # the message names the parameter of the request that first sent this spec: rename
            raise GrammarError(spec.param, renamed(item, spec.param))
        return item.for_spec(spec)

    def put(self, spec: StructuredSpec, item: CompiledStructure | GrammarError) -> None:
        size = len(spec.value) + (ERROR_BYTES if isinstance(item, GrammarError) else item.nbytes)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(spec.key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[spec.key] = (item, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.nbytes -= dropped

    def __len__(self) -> int:
        return len(self._items)


def renamed(err: GrammarError, param: str) -> str:
    if err.message.startswith(err.param + ":"):
        return param + err.message[len(err.param):]
    return err.message
