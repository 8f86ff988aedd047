"""The parser flags: vLLM's names, validated choices, and what they turn on."""

from __future__ import annotations

import pytest

from server.cli import build_config
from server.config import ConfigError


def test_parser_flags_and_env() -> None:
    cfg = build_config(["--tool-call-parser", "mistral", "--enable-auto-tool-choice", "--reasoning-parser", "qwen3",
                        "--chat-template", "{{ messages }}"], environ={})
    assert cfg.tool_call_parser == "mistral" and cfg.enable_auto_tool_choice and cfg.engine.reasoning_parser == "qwen3"
    assert cfg.chat_template == "{{ messages }}"
    env = build_config([], environ={"MOE_SERVE_TOOL_CALL_PARSER": "llama3_json",
                                    "MOE_SERVE_REASONING_PARSER": "deepseek_r1"})
    assert env.tool_call_parser == "llama3_json" and env.engine.reasoning_parser == "deepseek_r1"


@pytest.mark.parametrize("argv", [["--tool-call-parser", "nope"], ["--reasoning-parser", "o1"]])
def test_unknown_parsers_are_refused(argv) -> None:
    with pytest.raises(SystemExit):
        build_config(argv, environ={})


def test_auto_tool_choice_needs_a_parser() -> None:
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        build_config(["--enable-auto-tool-choice"], environ={})


def test_chat_template_from_a_file(tmp_path) -> None:
    from server.api.chat_messages import load_chat_template

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_chat_template(str(f)) == f.read_text()
    assert load_chat_template("{{ inline }}") == "{{ inline }}"


def test_vllm_args_carry_the_reasoning_parser() -> None:
    from server.config import EngineConfig
    from server.engine.structured.backend import CompiledStructure
    from server.engine.structured.spec import choice_spec, json_schema_spec, regex_spec
    from server.engine.vllm.args import engine_args_kwargs
    from server.engine.vllm.sampling import to_vllm_structured

    kw = engine_args_kwargs(EngineConfig(reasoning_parser="deepseek_r1"), on_cpu=True, environ={})
    assert kw["reasoning_parser"] == "deepseek_r1"
    assert "reasoning_parser" not in engine_args_kwargs(EngineConfig(), on_cpu=True, environ={})

    def mapped(spec):
        return to_vllm_structured(CompiledStructure(spec, None, 10))
    assert mapped(json_schema_spec({"type": "object"}, "p")) == {"json": {"type": "object"},
                                                                 "disable_any_whitespace": True}
    assert mapped(regex_spec("a+", "p")) == {"regex": "a+", "disable_any_whitespace": True}
    assert mapped(choice_spec(["x", "y"], "p"))["choice"] == ["x", "y"]
    assert to_vllm_structured(None) is None
