"""The grammar backend: xgrammar (compiler, per-sequence matchers, bitmask fill).

Why xgrammar (`python -m loadtest grammar-backends` measures it against llguidance: docs/benchmarks.md,
section "Grammar backend: xgrammar vs llguidance"): its per-token mask fill is a lookup in masks precomputed at compile
time for most tokens (context-independent tokens), so a step costs microseconds per sequence at
32k and 150k vocabularies alike, and its batch fill runs the rows on a thread pool.

Compilation (`GrammarCompiler.compile`) is the expensive part (milliseconds to seconds for a
large schema at a large vocabulary). It runs on the API's tokenizer thread, never on the engine
thread, and `GrammarCache` keeps the result per normalised spec.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import xgrammar as xgr

from server.engine.structured.spec import StructuredSpec, StructuredSpecError, choice_grammar

log = logging.getLogger(__name__)

_CPP_PREFIX = re.compile(r"^\[[0-9:.]+\]\s+\S+:\d+:\s*")
COMPILE_THREADS = max(1, min(4, os.cpu_count() or 1))
_JSON_OBJECT = '{"type": "object"}'


class GrammarError(StructuredSpecError):
    """The backend could not compile a spec (invalid schema / regex / grammar, unsupported feature)."""


@dataclass(frozen=True)
class CompiledStructure:
    """What the engine needs to constrain one request: the spec and its compiled grammar.

    `gate` (token ids): the constraint starts after the output has produced these tokens (the
    end of a reasoning part, e.g. `</think>`); empty: from the first token."""

    spec: StructuredSpec
    grammar: Any  # xgrammar.CompiledGrammar
    vocab_size: int
    gate: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default=())

    def with_gate(self, gate: tuple[int, ...]) -> CompiledStructure:
        return CompiledStructure(self.spec, self.grammar, self.vocab_size, tuple(gate), self.stop_token_ids)


def _clean(message: str) -> str:
    """xgrammar's C++ messages start with a timestamp and a source location: keep the rest."""
    first = message.strip().splitlines()[0] if message.strip() else message
    return _CPP_PREFIX.sub("", first).strip()


class GrammarCompiler:
    """Compiles specs for one tokenizer and vocabulary (the model's logits width).

    The tokenizer's table is built on first use (a second or so for a 150k vocabulary), on the
    calling thread: the API's tokenizer thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...] = (),
                 threads: int = COMPILE_THREADS):
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self._stop = tuple(stop_token_ids)
        self._threads = threads
        self._compiler: Any = None
        self.stop_token_ids = self._stop  # what the matchers stop on (the tokenizer's EOS when none given)
        self._lock = threading.Lock()
        self.num_compiles = 0  # grammars actually compiled (tests: once per distinct spec)

    def _get(self) -> Any:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self._stop) or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._threads, cache_enabled=False)
                self.stop_token_ids = tuple(info.stop_token_ids)
            return self._compiler

    def compile(self, spec: StructuredSpec) -> CompiledStructure:
        compiler = self._get()
        self.num_compiles += 1
        try:
            if spec.kind == "json":
                grammar = compiler.compile_json_schema(spec.value, any_whitespace=spec.any_whitespace,
                                                       strict_mode=True)
            elif spec.kind == "json_object":
                grammar = compiler.compile_json_schema(_JSON_OBJECT, any_whitespace=spec.any_whitespace)
            elif spec.kind == "regex":
                grammar = compiler.compile_regex(spec.value)
            elif spec.kind == "choice":
                grammar = compiler.compile_grammar(choice_grammar(spec.choices()))
            else:
                grammar = compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "invalid or unsupported JSON schema", "json_object": "cannot build the JSON grammar",
                    "regex": "invalid or unsupported regular expression", "choice": "cannot build the choices",
                    "grammar": "the EBNF grammar does not compile"}[spec.kind]
            raise GrammarError(spec.param, f"{spec.param}: {what}: {_clean(str(e))[:300]}") from None
        return CompiledStructure(spec, grammar, self.vocab_size, (), self.stop_token_ids)
