"""Structured-output fixtures: grammar compilers for the random tiny checkpoint, LLM engines."""

from __future__ import annotations

import pytest

from tests.engine.conftest import make_llm  # noqa: F401 - the engine fixture (blocks checked at the end)


@pytest.fixture()
def compile_for(make_llm):  # noqa: F811
    """compile_for(llm, spec) -> CompiledStructure for that engine's tokenizer and vocabulary."""
    from server.engine.structured.backend import GrammarCompiler

    compilers = {}

    def compile_(llm, spec):
        key = id(llm)
        if key not in compilers:
            compilers[key] = GrammarCompiler(llm.tokenizer, llm.core.vocab_size, llm.core.eos_token_ids)
        return compilers[key].compile(spec)

    return compile_
