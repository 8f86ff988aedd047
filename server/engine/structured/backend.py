"""The grammar backend: xgrammar (compiler, per-sequence matchers, bitmask fill).

Why xgrammar (`python -m loadtest grammar-backends` measures it against llguidance: docs/benchmarks.md,
section "Grammar backend: xgrammar vs llguidance"): its per-token mask fill is a lookup in masks precomputed at compile
time for most tokens (context-independent tokens), so a step costs microseconds per sequence at
32k and 150k vocabularies alike, and its batch fill runs the rows on a thread pool.

Compilation (`GrammarCompiler.compile`) is the expensive part (milliseconds to seconds for a
large schema at a large vocabulary). The server runs it in compile processes of its own
(compile_pool.py: a time and memory budget each, never the engine or tokenizer thread), and
`GrammarCache` keeps the result per normalised spec, bounded by bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from server.engine.structured.grammar_check import dead_rules
from server.engine.structured.spec import StructuredSpec, StructuredSpecError, choice_grammar

log = logging.getLogger(__name__)

_CPP_PREFIX = re.compile(r"^\[[0-9:.]+\]\s+\S+:\d+:\s*")
# xgrammar's own threads per compile: one, so that a compile takes at most one core from the
# engine (its default of 4 slowed running streams on 2 cores to about a third: docs/benchmarks.md,
# section "Numbers behind code choices"); the server runs compiles in parallel processes instead
# (compile_pool.py)
COMPILE_THREADS = 1
_JSON_OBJECT = '{"type": "object"}'


def xgr() -> Any:
    """The xgrammar module, imported on first use: a server that never sees a structured request
    does not hold it (about 45 MB of resident memory with its libraries)."""
    import xgrammar

    return xgrammar


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
    nbytes: int = 0  # the compiled grammar's memory (xgrammar's memory_size_bytes)

    def with_gate(self, gate: tuple[int, ...]) -> CompiledStructure:
        return dataclasses.replace(self, gate=tuple(gate))

    def for_spec(self, spec: StructuredSpec) -> CompiledStructure:
        """The same grammar, for an equal spec from another request field."""
        return self if spec.param == self.spec.param else dataclasses.replace(self, spec=spec)


def _clean(message: str) -> str:
    """xgrammar's C++ messages start with a timestamp and a source location: keep the rest."""
    first = message.strip().splitlines()[0] if message.strip() else message
    return _CPP_PREFIX.sub("", first).strip()


class GrammarError(StructuredSpecError):
    """The backend could not compile a spec (invalid schema / regex / grammar, unsupported feature)."""


class GrammarCompiler:
    """Compiles specs for one tokenizer and vocabulary (the model's logits width).

    The tokenizer's table is built on first use (a second or so for a 150k vocabulary), on the
    calling thread; `info` (an xgrammar TokenizerInfo, e.g. deserialized in a compile process)
    skips that."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...] = (),
                 threads: int = COMPILE_THREADS, info: Any = None):
        self._tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self._stop = tuple(stop_token_ids)
        self._threads = threads
        self._info = info
        self._compiler: Any = None
        self.stop_token_ids = tuple(info.stop_token_ids) if info is not None else self._stop
        self._lock = threading.Lock()
        self.num_compiles = 0  # grammars actually compiled (tests: once per distinct spec)

    def tokenizer_info(self) -> Any:
        """The xgrammar TokenizerInfo (built on first use)."""
        with self._lock:
            if self._info is None:
                self._info = xgr().TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self._stop) or None)
                self.stop_token_ids = tuple(self._info.stop_token_ids)
            return self._info

    def _get(self) -> Any:
        info = self.tokenizer_info()
        with self._lock:
            if self._compiler is None:
                self._compiler = xgr().GrammarCompiler(info, max_threads=self._threads, cache_enabled=False)
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
        if spec.kind in ("grammar", "regex"):
            _check_no_dead_ends(spec, grammar.grammar)
        return CompiledStructure(spec, grammar, self.vocab_size, (), self.stop_token_ids, grammar.memory_size_bytes)


def _check_no_dead_ends(spec: StructuredSpec, grammar: Any) -> None:
    dead = dead_rules(grammar.serialize_json())
    if not dead:
        return
    if spec.kind == "regex":
        raise GrammarError(spec.param, f"{spec.param}: the regular expression matches no text")
    if dead[0] == "root":
        raise GrammarError(spec.param, f"{spec.param}: the grammar accepts no output (its root rule derives no "
                                       f"finite text, as in `root ::= root`)")
    raise GrammarError(spec.param, f"{spec.param}: rule '{dead[0][:64]}' of the grammar derives no finite text, so "
                                   f"an output that enters it could never end")
