"""`tool_choice: "auto"`: for every tool-call parser, a streamed answer is the non-streamed one
(hardening round 2, item 5). The same adversarial outputs (duplicate keys, arguments that are
not JSON, names that are not strings, garbage after a call, outputs cut short, deep nesting...)
go through `ChoiceOutput` whole and streamed in many chunkings (one character at a time, whole,
random sizes, the final feed with or without text), and the content, the tool calls (names and
arguments) and the finish_reason must be equal. The decision itself is checked too: an output
either holds well-formed calls (each arguments text a JSON object) after its content, or it is
all content with finish_reason "stop"."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from server.api.chat_output import ChoiceOutput
from server.api.tool_parsers import TOOL_PARSERS
from server.api.tools import ToolPlan

GOOD_ARGS = '{"city": "Paris", "days": [1, 2], "q": "a \\"quoted\\" } ] string"}'
ARGS = {  # arguments texts: the first two are well-formed
    "object": GOOD_ARGS, "empty": "{}",
    "dots": '{"v": 1.2.3}', "bare_dots": "1.2.3", "plus": '{"v": +1}', "bare_plus": "+1",
    "bad_escape": '{"q": "\\q"}', "bare_bad_escape": '"\\q"', "unterminated": '{"city": "Par',
    "array": "[1, 2]", "number": "5", "null": "null", "nan": '{"v": NaN}', "duplicate_key": '{"a": 1, "a": 2}',
    "extra_brace": '{"a": 1}}', "single_quotes": "{'a': 1}", "deep": '{"a": ' * 1500 + "1" + "}" * 1500,
}
NAMES = {  # the name as JSON text: the first is well-formed
    "plain": '"get_weather"', "number": "5", "empty": '""', "space": '"get weather"', "null": "null",
    "duplicate": '"a", "name": "b"',
}
CALLS_BEGIN, CALL_BEGIN = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"
CALL_END, CALLS_END, SEP = "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁sep｜>"
KIMI_BEGIN, KIMI_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
# openai-harmony (the `openai` parser) reads o200k_base from here (scripts/install_agents.sh writes it)
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(Path(__file__).resolve().parents[2] / ".tools" / "tiktoken"))


def _bare(name: str) -> str:
    """The name as the formats that write it bare (mistral v11, deepseek) have it."""
    try:
        value = json.loads(name)
    except ValueError:
        return name
    return value if isinstance(value, str) else name


def call_text(parser: str, name: str, args: str, variant: int = 0) -> str:
    """One call in `parser`'s format (`variant` 1: mistral's v11 form)."""
    if parser == "hermes":
        return f'<tool_call>\n{{"name": {name}, "arguments": {args}}}\n</tool_call>'
    if parser == "llama3_json":
        return f'{{"name": {name}, "parameters": {args}}}'
    if parser == "mistral":
        if variant:
            return f"[TOOL_CALLS]{_bare(name)}[ARGS]{args}"
        return f'[TOOL_CALLS][{{"name": {name}, "arguments": {args}}}]'
    if parser == "deepseek_v3":
        return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{_bare(name)}\n```json\n{args}\n```{CALL_END}{CALLS_END}"
    # the formats that write arguments as key / value text: one argument `v` holding the text
    bare = _bare(name)
    if parser == "glm45":
        return f"<tool_call>{bare}\n<arg_key>v</arg_key>\n<arg_value>{args}</arg_value>\n</tool_call>"
    if parser == "qwen3_coder":
        return f"<tool_call>\n<function={bare}>\n<parameter=v>\n{args}\n</parameter>\n</function>\n</tool_call>"
    if parser == "minimax_m2":
        return (f'<minimax:tool_call>\n<invoke name="{bare}">\n<parameter name="v">{args}</parameter>\n</invoke>\n'
                f"</minimax:tool_call>")
    if parser == "kimi_k2":
        return (f"{KIMI_BEGIN}<|tool_call_begin|>functions.{bare}:0<|tool_call_argument_begin|>{args}"
                f"<|tool_call_end|>{KIMI_END}")
    if parser == "llama4_pythonic":
        return f"[{bare}(v={args})]"
    assert parser == "openai", parser
    return f"<|start|>assistant to=functions.{bare}<|channel|>commentary json<|message|>{args}<|call|>"


def two_calls(parser: str, first: str, second: str) -> str:
    """Two calls in one output (the second's arguments `second`)."""
    a, b = '"get_weather"', '"get_time"'
    if parser == "hermes":
        return call_text(parser, a, first) + "\n" + call_text(parser, b, second)
    if parser == "llama3_json":
        return call_text(parser, a, first) + "; " + call_text(parser, b, second)
    if parser == "mistral":
        return f'[TOOL_CALLS][{{"name": {a}, "arguments": {first}}}, {{"name": {b}, "arguments": {second}}}]'
    if parser == "deepseek_v3":
        one = call_text(parser, a, first)[: -len(CALLS_END)]
        return one + call_text(parser, b, second)[len(CALLS_BEGIN):]
    if parser == "kimi_k2":
        return call_text(parser, a, first)[: -len(KIMI_END)] + call_text(parser, b, second)[len(KIMI_BEGIN):]
    if parser == "llama4_pythonic":
        return call_text(parser, a, first)[:-1] + ", " + call_text(parser, b, second)[1:]
    return call_text(parser, a, first) + "\n" + call_text(parser, b, second)


def outputs(parser: str) -> list[str]:
    out: list[str] = []
    bodies = [(NAMES["plain"], a) for a in ARGS.values()] + [(n, GOOD_ARGS) for n in list(NAMES.values())[1:]]
    variants = (0, 1) if parser == "mistral" else (0,)
    for name, args in bodies:
        for v in variants:
            call = call_text(parser, name, args, v)
            out += [call, "Let me check. " + call, call + " and then some text", "  \n" + call + "\n",
                    call[: len(call) * 2 // 3]]  # cut short (max_tokens)
    for args in ARGS.values():
        out += [two_calls(parser, GOOD_ARGS, args), two_calls(parser, args, "{}")]
    marker = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]",
              "deepseek_v3": CALLS_BEGIN, "glm45": "<tool_call>", "qwen3_coder": "<tool_call>",
              "minimax_m2": "<minimax:tool_call>", "kimi_k2": KIMI_BEGIN, "llama4_pythonic": "[get_weather(",
              "openai": "<|start|>assistant to=functions."}[parser]
    good = call_text(parser, NAMES["plain"], GOOD_ARGS)
    out += ["", " ", "Just text.", "Text with a partial marker at the end " + marker[:-2], marker,
            marker + " not a call", "Text " + marker, good + good, good + marker, marker[:3] + good,
            "The tool_call format: {\"name\": 1}", '{"not": "a call"}', "{", "}" + good]
    if parser == "hermes":
        out += ['<tool_call>\n{"name": "get_weather", "arguments": {}}', "<tool_call></tool_call>",
                '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>garbage</tool_call>',
                '<tool_call>\n{"name": "get_weather", "arguments": {}} trailing\n</tool_call>',
                '<tool_call>\n{"name": "get_weather", "arguments": {}, "parameters": {}}\n</tool_call>',
                '<tool_call>\n{"name": "get_weather"}\n</tool_call>', "<tool_call>\n[1, 2]\n</tool_call>"]
    if parser == "llama3_json":
        out += ['<|python_tag|>{"name": "get_weather", "parameters": {}};', '{"name": "f", "parameters": {}} {"name": "g"}']
    if parser == "mistral":
        out += ["[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{}", "[TOOL_CALLS]get_weather{}", "[TOOL_CALLS][]",
                "[TOOL_CALLS][5]", "[TOOL_CALLS]get_weather[ARGS]{}[TOOL_CALLS]", "[TOOL_CALLS] [ARGS]{}"]
    if parser == "deepseek_v3":
        out += [CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f\n```json\n{}\n```", CALLS_BEGIN + CALLS_END,
                CALLS_BEGIN + CALL_BEGIN + "other" + SEP + "f\n```json\n{}\n```" + CALL_END + CALLS_END]
    return out


def whole(parser: str, text: str) -> tuple[str, list[tuple[str, str]], str | None]:
    out = ChoiceOutput(ToolPlan([{}], "auto"), TOOL_PARSERS[parser](), None)
    msg, called = out.message(text)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]
    for c in msg.get("tool_calls") or []:
        assert c["type"] == "function" and c["id"]
    return msg["content"] or "", calls, out.finish_reason("stop", called)


def streamed(parser: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], str | None]:
    out = ChoiceOutput(ToolPlan([{}], "auto"), TOOL_PARSERS[parser](), None)
    content, calls = "", []
    for k, piece in enumerate(pieces):
        delta = out.feed(piece, final=k == len(pieces) - 1)
        assert set(delta) <= {"content", "tool_calls"}
        content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            if "id" in d:  # OpenAI's first delta of a call: index, id, type, name, empty arguments
                assert d["index"] == len(calls) and d["type"] == "function" and d["function"]["arguments"] == ""
                calls.append([d["function"]["name"], ""])
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]][1] += d["function"]["arguments"]
    return content, [(n, a) for n, a in calls], out.stream_finish_reason("stop")


def chunkings(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    out = [[text], [text, ""]]  # the final feed with text, or empty after it
    if len(text) <= 400:
        out.append(list(text) or [""])
        out.append([*text, ""])
    for _ in range(3):
        pieces, pos = [], 0
        while pos < len(text):
            step = rng.randint(1, 9)
            pieces.append(text[pos:pos + step])
            pos += step
        out.append(pieces or [""])
    return out


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_streamed_equals_whole_for_adversarial_outputs(parser: str) -> None:
    texts = outputs(parser)
    assert len(texts) > 150
    for text in texts:
        content, calls, finish = expected = whole(parser, text)
        # the decision: well-formed calls after the content, or all content
        if calls:
            assert finish == "tool_calls" and text.startswith(content), text
            for name, args in calls:
                assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) and isinstance(json.loads(args), dict), text
        else:
            assert (content, finish) == (text, "stop"), text
        for pieces in chunkings(text):
            assert streamed(parser, pieces) == expected, (text[:300], pieces[:20])


CASES = {  # parser: (output, called): hand-checked decisions
    "hermes": [(call_text("hermes", '"get_weather"', GOOD_ARGS), True),
               ("Sure. " + call_text("hermes", '"get_weather"', "{}"), True),
               (call_text("hermes", '"a", "name": "b"', "{}"), False),  # duplicate name: a or b?
               (call_text("hermes", '"get_weather"', "{}") + " garbage", False),
               (call_text("hermes", '"get_weather"', "1.2.3"), False), (call_text("hermes", "5", "{}"), False),
               (call_text("hermes", '"get_weather"', '{"q": "\\q"}'), False),
               (call_text("hermes", '"get_weather"', '{"city": "Par'), False)],
    "mistral": [(call_text("mistral", '"get_weather"', GOOD_ARGS), True),
                (call_text("mistral", '"get_weather"', GOOD_ARGS, 1), True),
                (call_text("mistral", '"get_weather"', "+1", 1), False)],
    "llama3_json": [(call_text("llama3_json", '"get_weather"', GOOD_ARGS), True), ('{"not": "a call"}', False)],
    "deepseek_v3": [(call_text("deepseek_v3", '"get_weather"', GOOD_ARGS), True),
                    (call_text("deepseek_v3", '"get_weather"', '{"a": 1, "a": 2}'), False)],
}


@pytest.mark.parametrize("parser,text,called", [(p, t, c) for p, cs in CASES.items() for t, c in cs])
def test_decisions(parser: str, text: str, called: bool) -> None:
    content, calls, finish = whole(parser, text)
    assert bool(calls) == called and finish == ("tool_calls" if called else "stop")
    if not called:
        assert content == text  # nothing is lost: the output comes back as content
