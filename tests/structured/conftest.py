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


# -- real servers -------------------------------------------------------------------------------
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.server.conftest import start_server  # noqa: E402

HERE = Path(__file__).resolve().parent
QWEN_TEMPLATE = HERE / "qwen_template.jinja"
# the reasoning/tool checkpoint's added tokens (single tokens, as in Qwen's tokenizer)
THINK_START, THINK_END, CALL_START, CALL_END = "<think>", "</think>", "<tool_call>", "</tool_call>"


@pytest.fixture(scope="session")
def structured_server(tmp_path_factory):
    """The bundled model, room for long structured outputs, the hermes tool parser."""
    s = start_server(["--max-model-len", "512", "--num-kv-blocks", "1024", "--max-num-seqs", "32", "--seed", "0",
                      "--tool-call-parser", "hermes", "--drain-timeout", "5"],
                     tmp_path_factory.mktemp("structured-server"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


@pytest.fixture(scope="session")
def think_model(tiny_mixtral, tmp_path_factory) -> str:
    """The random tiny Mixtral with `<think>`, `</think>`, `<tool_call>`, `</tool_call>` added to
    its tokenizer as single tokens (ids 300-303 of its 320-entry vocabulary)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("think-mixtral")
    for f in Path(tiny_mixtral).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_tokens([THINK_START, THINK_END, CALL_START, CALL_END])
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def think_server(think_model, tmp_path_factory):
    """qwen3 reasoning parser, hermes tool parser, a Qwen-style template from --chat-template."""
    s = start_server(["--model", think_model, "--max-model-len", "1024", "--num-kv-blocks", "512",
                      "--max-num-seqs", "16", "--seed", "0", "--reasoning-parser", "qwen3",
                      "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                      "--chat-template", str(QWEN_TEMPLATE), "--drain-timeout", "5"],
                     tmp_path_factory.mktemp("think-server"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]
