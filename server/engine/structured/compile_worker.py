"""The compile process: the trial compile of one spec at a time for the compile pool
(compile_pool.py), where it may be killed.

It starts from the pool's forkserver (which imported this module, xgrammar with it, once), gets
the tokenizer table as xgrammar's serialized JSON, says "ready", then answers each spec it
receives with one message:
- ("ok", memory_size_bytes, seconds)          (it compiles, within the limits)
- ("error", message naming the spec's field)  (invalid, unsupported, no output possible)
- ("too_large", memory_size_bytes, seconds)   (over the pool's per-grammar limit)
The pool kills it when a compile runs past its time or memory budget, so nothing here needs
to be interruptible.
"""

from __future__ import annotations

import os
import time
from typing import Any

import xgrammar as xgr

from server.engine.structured.backend import GrammarCompiler, GrammarError


def serve(conn: Any, info_json: str, vocab_size: int, threads: int, max_grammar_bytes: int) -> None:
    try:
        os.nice(10)  # the engine's threads come first
    except OSError:
        pass
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    compiler = GrammarCompiler(None, vocab_size, threads=threads, info=info)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        if spec is None:
            return
        conn.send(_compile(compiler, spec, max_grammar_bytes))


def _compile(compiler: GrammarCompiler, spec: Any, max_grammar_bytes: int) -> tuple:
    start = time.perf_counter()
    try:
        compiled = compiler.compile(spec)
    except GrammarError as e:
        return ("error", e.message)
    except Exception as e:  # noqa: BLE001 - xgrammar raising something unexpected: a 400 too
        return ("error", f"{spec.param}: the grammar backend failed on it ({type(e).__name__})")
    seconds = time.perf_counter() - start
    return ("too_large" if compiled.nbytes > max_grammar_bytes else "ok", compiled.nbytes, seconds)
