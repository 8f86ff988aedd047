"""Tool-call and reasoning parsers on text: whole outputs, and streamed in every chunking, the
deltas adding up to exactly the whole-output answer."""

from __future__ import annotations

import json
import random

import pytest

from server.api.chat_output import ChoiceOutput
from server.api.reasoning import REASONING_PARSERS, ThinkReasoningParser
from server.api.tool_parsers import TOOL_PARSERS
from server.api.tool_parsers.json_scan import array_items, object_fields, value_end
from server.api.tools import ToolPlan
from server.config import REASONING_PARSERS as REASONING_NAMES
from server.config import TOOL_CALL_PARSERS as TOOL_NAMES

ARGS1 = '{"city": "Paris", "days": [1, 2], "unit": {"c": true}}'
ARGS2 = '{"q": "a \\"quoted\\" } ] string"}'
DS = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"

CASES = {  # parser: (output text, expected content, [(name, arguments)])
    "hermes": [
        (f'Let me check.<tool_call>\n{{"name": "get_weather", "arguments": {ARGS1}}}\n</tool_call>',
         "Let me check.", [("get_weather", ARGS1)]),
        (f'<tool_call>\n{{"arguments": {ARGS2}, "name": "search"}}\n</tool_call>\n<tool_call>\n'
         f'{{"name": "now", "arguments": {{}}}}\n</tool_call>', None, [("search", ARGS2), ("now", "{}")]),
        ('<tool_call>\n{"name": "ping"}\n</tool_call>', None, [("ping", "{}")]),
        ("no tools here, just a < sign and <tool_", "no tools here, just a < sign and <tool_", []),
        ('<tool_call>\n{"name": "broken", "arguments": {"a": 1', '<tool_call>\n{"name": "broken", "arguments": {"a": 1',
         []),
    ],
    "llama3_json": [
        (f'{{"name": "get_weather", "parameters": {ARGS1}}}', None, [("get_weather", ARGS1)]),
        (f'<|python_tag|>{{"name": "a", "parameters": {ARGS2}}}; {{"name": "b", "parameters": {{}}}}', None,
         [("a", ARGS2), ("b", "{}")]),
        ("The weather is nice.", "The weather is nice.", []),
        ('{"not": "a call"}', '{"not": "a call"}', []),
    ],
    "mistral": [
        (f'Sure. [TOOL_CALLS][{{"name": "get_weather", "arguments": {ARGS1}}}, {{"name": "b", "arguments": {ARGS2}}}]',
         "Sure. ", [("get_weather", ARGS1), ("b", ARGS2)]),
        (f"[TOOL_CALLS]get_weather[ARGS]{ARGS1}[TOOL_CALLS]b[CALL_ID]abc123XYZ[ARGS]{ARGS2}", None,
         [("get_weather", ARGS1), ("b", ARGS2)]),
        ("plain [TOOL", "plain [TOOL", []),
    ],
    "deepseek_v3": [
        ("Checking. " + DS.format(name="get_weather", args=ARGS1) + "<｜tool▁calls▁end｜>", "Checking. ",
         [("get_weather", ARGS1)]),
        (DS.format(name="a", args=ARGS2) + DS.format(name="b", args="{}")[len("<｜tool▁calls▁begin｜>"):]
         + "<｜tool▁calls▁end｜>", None, [("a", ARGS2), ("b", "{}")]),
        ("just text", "just text", []),
    ],
}


def test_registries_match_the_config_names() -> None:
    assert tuple(TOOL_PARSERS) == TOOL_NAMES
    assert tuple(REASONING_PARSERS) == REASONING_NAMES


@pytest.mark.parametrize("name,case", [(n, c) for n, cs in CASES.items() for c in cs])
def test_extract(name: str, case: tuple) -> None:
    text, content, calls = case
    got_content, got_calls = TOOL_PARSERS[name]().extract(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        assert c["type"] == "function" and c["id"]
        json.loads(c["function"]["arguments"])
    if name == "mistral":
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in got_calls)


def _stream(parser, text: str, sizes: list[int]) -> tuple[str, list[dict]]:
    stream = parser.stream()
    content, deltas, pos = "", [], 0
    for size in sizes:
        pos = min(len(text), pos + size)
        c, d = stream.update(text[:pos], final=pos == len(text))
        content += c
        deltas += d
    if pos < len(text):
        c, d = stream.update(text, final=True)
        content += c
        deltas += d
    return content, deltas


def _chunkings(text: str) -> list[list[int]]:
    rng = random.Random(len(text))
    return [[1] * len(text), [len(text)], [rng.randint(1, 7) for _ in range(len(text))]]


@pytest.mark.parametrize("name,case", [(n, c) for n, cs in CASES.items() for c in cs if c[2]])
def test_streaming_adds_up_to_extract(name: str, case: tuple) -> None:
    text, content, calls = case
    parser = TOOL_PARSERS[name]()
    for sizes in _chunkings(text):
        got_content, deltas = _stream(parser, text, sizes)
        assert got_content == (content or "")
        rebuilt: dict[int, dict] = {}
        for d in deltas:
            i = d["index"]
            if "id" in d:  # the first delta of a call: id, type, name, empty arguments
                assert i == len(rebuilt) and d["type"] == "function" and d["function"]["arguments"] == ""
                rebuilt[i] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                rebuilt[i]["arguments"] += d["function"]["arguments"]
        assert [(c["name"], c["arguments"]) for c in rebuilt.values()] == calls


def test_partial_tags_are_held_back_then_released() -> None:
    stream = TOOL_PARSERS["hermes"]().stream()
    assert stream.update("Hello <tool", final=False) == ("Hello ", [])
    assert stream.update("Hello <tool", final=True) == ("<tool", [])


def test_json_scan() -> None:
    s = '{"a": [1, {"b": "x}]"}], "c": tru'
    fields, end = object_fields(s, 0)
    assert end is None and [f[0] for f in fields] == ["a", "c"]
    assert s[fields[0][1]:fields[0][2]] == '[1, {"b": "x}]"}]' and fields[1][2] is None
    assert value_end("123", 0) is None and value_end("123,", 0) == 3 and value_end('"a\\"b"', 0) == 6
    assert array_items("[1, 2", 0) == ([(1, 2), (4, None)], None)
    with pytest.raises(ValueError):
        object_fields('{"a" 1}', 0)


@pytest.mark.parametrize("name", sorted(n for n, p in REASONING_PARSERS.items() if issubclass(p, ThinkReasoningParser)))
def test_reasoning_split_streamed_and_whole(name: str) -> None:
    text = "<think>\nLet me think about </thin and more.\n</think>\n\nThe answer."
    plan = ToolPlan(None, "none")
    whole, _ = ChoiceOutput(plan, None, REASONING_PARSERS[name](True)).message(text)
    assert whole["reasoning_content"] == "\nLet me think about </thin and more.\n"
    assert whole["content"] == "\n\nThe answer."
    for sizes in _chunkings(text):
        out = ChoiceOutput(plan, None, REASONING_PARSERS[name](True))
        got = {"reasoning_content": "", "content": ""}
        pos = 0
        for size in sizes + [0]:
            pos = min(len(text), pos + size)
            for k, v in out.feed(text[len(out.text):pos], final=pos == len(text) and size == 0).items():
                got[k] += v
        assert got == {"reasoning_content": whole["reasoning_content"], "content": whole["content"]}
    # unfinished reasoning is all reasoning; a model that does not think (starts in content) too
    assert ChoiceOutput(plan, None, REASONING_PARSERS[name](True)).message("still thinking")[0] == \
        {"role": "assistant", "content": "", "reasoning_content": "still thinking"}
    assert ChoiceOutput(plan, None, REASONING_PARSERS[name](False)).message("plain")[0]["content"] == "plain"


def test_qwen3_thinking_off_and_closed_prompts() -> None:
    qwen, r1 = REASONING_PARSERS["qwen3"], REASONING_PARSERS["deepseek_r1"]
    assert qwen.starts_in_reasoning("<|im_start|>assistant\n", None)
    assert not qwen.starts_in_reasoning("<|im_start|>assistant\n", {"enable_thinking": False})
    assert r1.starts_in_reasoning("<｜Assistant｜><think>\n", {"enable_thinking": False})
    assert not r1.starts_in_reasoning("<think>\n\n</think>\n\n", None)


def test_reasoning_then_tool_call_streamed() -> None:
    text = f'<think>plan</think><tool_call>\n{{"name": "f", "arguments": {ARGS1}}}\n</tool_call>'
    out = ChoiceOutput(ToolPlan([{}], "auto"), TOOL_PARSERS["hermes"](), REASONING_PARSERS["qwen3"](True))
    msg, called = ChoiceOutput(ToolPlan([{}], "auto"), TOOL_PARSERS["hermes"](),
                               REASONING_PARSERS["qwen3"](True)).message(text)
    assert called and msg["reasoning_content"] == "plan" and msg["content"] is None
    deltas = [out.feed(ch) for ch in text] + [out.feed("", final=True)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "plan"
    args = "".join(t["function"]["arguments"] for d in deltas for t in d.get("tool_calls", []))
    assert args == ARGS1 == msg["tool_calls"][0]["function"]["arguments"]
    assert out.stream_finish_reason("stop") == "tool_calls" and out.stream_finish_reason("length") == "length"
