"""Compiled grammars, kept per normalised spec (LRU): a schema is compiled once however many
requests use it. Failures are cached too, so a bad schema sent again is refused at once."""

from __future__ import annotations

import threading
from collections import OrderedDict

from server.engine.structured.backend import CompiledStructure, GrammarCompiler, GrammarError
from server.engine.structured.spec import StructuredSpec

DEFAULT_CAPACITY = 256  # distinct specs kept


class GrammarCache:
    def __init__(self, compiler: GrammarCompiler, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.compiler = compiler
        self.capacity = capacity
        self._items: OrderedDict[tuple, CompiledStructure | GrammarError] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, spec: StructuredSpec) -> CompiledStructure:
        """The compiled grammar for `spec` (raises GrammarError naming spec.param)."""
        key = spec.key
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if item is None:
            self.misses += 1
            try:
                item = self.compiler.compile(spec)
            except GrammarError as e:
                item = e
            with self._lock:
                self._items[key] = item
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        if isinstance(item, GrammarError):
            # the message names the parameter of the request that first sent this spec: rename
            raise GrammarError(spec.param, _renamed(item, spec.param))
        return item if item.spec.param == spec.param else CompiledStructure(
            spec, item.grammar, item.vocab_size, item.gate, item.stop_token_ids)

    def __len__(self) -> int:
        return len(self._items)


def _renamed(err: GrammarError, param: str) -> str:
    if err.message.startswith(err.param + ":"):
        return param + err.message[len(err.param):]
    return err.message
