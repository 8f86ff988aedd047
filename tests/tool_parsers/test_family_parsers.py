"""The tool-call parsers of the families served, on the exact strings each model's own chat
template writes for tool calls (templates/SOURCES.md): the template renders an assistant turn
with calls from the history, and the parser must recover the names and arguments exactly,
from the whole turn and streamed in every chunking (every split in two, one character at a
time, random chunk sizes), the streamed deltas adding up to the whole answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from transformers import AutoTokenizer

from server.api.chat_messages import render
from server.api.protocol import ChatMessage
from server.api.tool_parsers import TOOL_PARSERS
from server.config import BUNDLED_MODEL

TEMPLATES = Path(__file__).resolve().parent / "templates"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"},
        "metric": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "run.cmd", "parameters": {"type": "object", "properties": {
        "argv": {"type": "array"}, "opts": {"type": "object"}, "note": {"type": "string"}}}}},
]
RICH = [("get_weather", {"city": 'Paris "FR"\nline 2 <b>', "days": 3, "zip": "75001", "metric": True}),
        ("run.cmd", {"argv": ["ls", "-l"], "opts": {"deep": True, "n": None, "x": 1.5}, "note": "  spaced  "})]
STRINGS = [("get_weather", {"city": "Paris", "zip": "75001"}), ("run.cmd", {"note": "x, y = (1)"})]

# parser: (template, the text just before the assistant's output, the text that ends it, calls)
FAMILIES = {
    "glm45": ("glm45.jinja", "</think>", "<|observation|>", RICH),
    "kimi_k2": ("kimi_k2.jinja", "<|im_assistant|>assistant<|im_middle|>", "<|im_end|>", RICH),
    "qwen3_coder": ("qwen3_coder.jinja", "<|im_start|>assistant\n", "<|im_end|>", RICH),
    "minimax_m2": ("minimax_m2.jinja", "</think>\n", "[e~[", RICH),
    # the template writes every value as a quoted string ("%s" | format): strings round-trip
    "llama4_pythonic": ("llama4_pythonic.jinja", "<|header_start|>assistant<|header_end|>\n\n", "<|eot|>", STRINGS),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def model_turn(tokenizer, family: str, content: str | None) -> tuple[str, list[tuple[str, dict]]]:
    """What the model wrote in its tool-calling turn, as its template renders it."""
    template, before, after, calls = FAMILIES[family]
    history = [{"role": "user", "content": "Weather, then list files."},
               {"role": "assistant", "content": content, "reasoning": "I will call two tools.", "tool_calls": [
                   {"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                   for k, (n, a) in enumerate(calls)]},
               *({"role": "tool", "tool_call_id": f"call_{k}", "content": "done"} for k in range(len(calls)))]
    messages = TypeAdapter(list[ChatMessage]).validate_python(history)
    text = render(tokenizer, messages, False, tools=TOOLS, chat_template=(TEMPLATES / template).read_text())
    turn = text[text.index(before) + len(before):]
    return turn[:turn.index(after)], calls


def _decided(name: str, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    content, calls = TOOL_PARSERS[name]().for_tools(TOOLS).extract(text)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _streamed(name: str, text: str, sizes: list[int]) -> tuple[str, list[tuple[str, dict]]]:
    stream = TOOL_PARSERS[name]().for_tools(TOOLS).stream()
    content, rebuilt, pos = "", {}, 0
    for size in [*sizes, len(text)]:
        pos = min(len(text), pos + size)
        piece, deltas = stream.update(text[:pos], final=pos == len(text))
        content += piece
        for d in deltas:
            if "id" in d:
                assert d["index"] == len(rebuilt) and d["function"]["arguments"] == ""
                rebuilt[d["index"]] = [d["function"]["name"], ""]
            else:
                rebuilt[d["index"]][1] += d["function"]["arguments"]
        if pos == len(text):
            break
    return content, [(n, json.loads(a)) for n, a in rebuilt.values()]


def _chunkings(text: str) -> list[list[int]]:
    rng = random.Random(7)
    return ([[k] for k in range(1, len(text))] + [[1] * len(text)]
            + [[rng.randint(1, 9) for _ in range(len(text))] for _ in range(20)])


@pytest.mark.parametrize("content", ["Let me check.", None])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_calls_rendered_by_the_template_are_recovered(tokenizer, family: str, content: str | None) -> None:
    turn, calls = model_turn(tokenizer, family, content)
    got_content, got_calls = _decided(family, turn)
    assert got_calls == calls, turn
    assert (got_content or "").strip() == (content or ""), turn
    for sizes in _chunkings(turn):
        streamed_content, streamed_calls = _streamed(family, turn, sizes)
        assert streamed_calls == calls and streamed_content == (got_content or ""), (sizes, turn)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_malformed_sections_are_content(tokenizer, family: str) -> None:
    """Cut or garbled call sections decide for content, whole and streamed: nothing is lost."""
    turn, _ = model_turn(tokenizer, family, "Let me check.")
    for bad in (turn + " trailing text", turn.replace(">", ">>", 3)[: len(turn) - 3] + "@@@"):
        content, calls = _decided(family, bad)
        if calls:  # a cut that still leaves whole calls (a missing closing marker) is allowed
            assert content is not None and content.strip() == "Let me check."
            continue
        assert content == bad
        assert _streamed(family, bad, [5] * len(bad)) == (bad, [])


def test_llama4_pythonic_literals() -> None:
    text = '[get_weather(city="Paris", days=3, metric=True, extra={"a": [1, None]}), run.cmd()]'
    assert _decided("llama4_pythonic", text) == (
        None, [("get_weather", {"city": "Paris", "days": 3, "metric": True, "extra": {"a": [1, None]}}),
               ("run.cmd", {})])
    for not_calls in ("see [1] and [2]", "[f(1)]", "[f(x=open('y'))]", "[f(x=1, x=2)]", "[f(x={1, 2})]"):
        assert _decided("llama4_pythonic", not_calls) == (not_calls, [])
    assert _decided("llama4_pythonic", '<|python_start|>[f(a="b")]<|python_end|>') == (None, [("f", {"a": "b"})])


def test_kimi_call_names_come_from_the_call_ids() -> None:
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.run.cmd:0<|tool_call_argument_begin|>"
            '{"a": 1}<|tool_call_end|><|tool_calls_section_end|>')
    assert _decided("kimi_k2", text) == (None, [("run.cmd", {"a": 1})])
    _, calls = TOOL_PARSERS["kimi_k2"]().extract(text)
    assert calls[0]["id"] == "functions.run.cmd:0"  # the model's own id, streamed too
    assert TOOL_PARSERS["kimi_k2"]().stream().update(text, final=True)[1][0]["id"] == "functions.run.cmd:0"
    assert _decided("kimi_k2", text.replace(":0", ""))[1] == []  # no index: not a Kimi call id


def test_xml_arguments_follow_the_schema_types() -> None:
    """A string parameter keeps its text even when it looks like JSON; other types are JSON."""
    text = '<tool_call>get_weather\n<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n' \
           '<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>free</arg_key>\n<arg_value>[1]</arg_value>\n' \
           '</tool_call>'
    assert _decided("glm45", text)[1] == [("get_weather", {"zip": "75001", "days": 3, "free": [1]})]
    dup = text.replace("<arg_key>days</arg_key>", "<arg_key>zip</arg_key>")
    assert _decided("glm45", dup) == (dup, [])  # a duplicate argument: malformed, all content


# -- gpt-oss (harmony): the `openai` tool parser with the `openai_gptoss` reasoning parser --------
TIKTOKEN = Path(__file__).resolve().parents[2] / ".tools" / "tiktoken"


@pytest.fixture(scope="module")
def harmony_vocab() -> None:
    """openai-harmony reads o200k_base from TIKTOKEN_ENCODINGS_BASE (no network here):
    scripts/install_agents.sh writes it to .tools/tiktoken."""
    import os

    if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        assert (TIKTOKEN / "o200k_base.tiktoken").is_file(), \
            "the o200k_base vocabulary is missing: run scripts/install_agents.sh (it writes .tools/tiktoken)"
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(TIKTOKEN)


def _gpt_oss_turns(tokenizer) -> tuple[str, str]:
    """(the tool-calling turn, the answering turn) as gpt-oss's template renders them."""
    name, args = RICH[0]
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "reasoning": "I will call get_weather.", "tool_calls": [
                   {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
               {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}]
    template = (TEMPLATES / "gpt-oss.jinja").read_text()
    tools = [{"type": t["type"], "function": {**t["function"], "description": "d"}} for t in TOOLS]
    for t in tools:
        t["function"]["parameters"] = {"type": "object", "properties": {
            k: {**v, "description": k} for k, v in t["function"]["parameters"]["properties"].items()}}
    text = render(tokenizer, TypeAdapter(list[ChatMessage]).validate_python(history), True, tools=tools,
                  chat_template=template)
    head = "<|start|>user<|message|>Weather?<|end|><|start|>assistant"
    call = text[text.index(head) + len(head):]
    call = call[:call.index("<|start|>functions.")]
    answered = history + [{"role": "assistant", "content": "It is sunny.", "reasoning": "Say it."}]
    text = render(tokenizer, TypeAdapter(list[ChatMessage]).validate_python(answered), False, tools=tools,
                  chat_template=template)
    answer = text[text.index('"sunny"<|end|><|start|>assistant') + len('"sunny"<|end|><|start|>assistant'):]
    return call, answer


def _choice(feed_sizes: list[int] | None, text: str) -> dict:
    from server.api.chat_output import ChoiceOutput
    from server.api.reasoning import REASONING_PARSERS
    from server.api.tools import ToolPlan

    out = ChoiceOutput(ToolPlan(TOOLS, "auto"), TOOL_PARSERS["openai"](), REASONING_PARSERS["openai_gptoss"](False))
    if feed_sizes is None:
        msg, _ = out.message(text)
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])]
        return {"reasoning": msg.get("reasoning_content") or "", "content": msg["content"] or "", "calls": calls}
    got: dict = {"reasoning": "", "content": "", "calls": {}}
    pos = 0
    for size in [*feed_sizes, len(text)]:
        pos = min(len(text), pos + size)
        d = out.feed(text[len(out.text):pos], final=pos == len(text))
        got["reasoning"] += d.get("reasoning_content", "")
        got["content"] += d.get("content", "")
        for t in d.get("tool_calls", []):
            entry = got["calls"].setdefault(t["index"], [t["function"].get("name"), ""])
            entry[1] += t["function"].get("arguments", "")
        if pos == len(text):
            break
    got["calls"] = [(n, json.loads(a)) for n, a in got["calls"].values()]
    return got


def test_gpt_oss_harmony_turns_from_its_template(tokenizer, harmony_vocab) -> None:
    call, answer = _gpt_oss_turns(tokenizer)
    assert call.startswith("<|channel|>analysis<|message|>I will call get_weather.<|end|>")
    whole = _choice(None, call)
    assert whole == {"reasoning": "I will call get_weather.", "content": "", "calls": [RICH[0]]}, call
    assert _choice(None, answer) == {"reasoning": "Say it.", "content": "It is sunny.", "calls": []}, answer
    for text in (call, answer):
        expected = _choice(None, text)
        for sizes in _chunkings(text)[::3]:
            assert _choice(sizes, text) == expected, (sizes, text)


def test_gpt_oss_calls_rendered_by_openai_harmony(harmony_vocab) -> None:
    """The package's own renderer: two calls (one with a <|constrain|> content type)."""
    from openai_harmony import Author, Conversation, Message, Role

    from server.api.harmony import encoding

    msgs = [Message.from_role_and_content(Role.USER, "go"),
            Message.from_role_and_content(Role.ASSISTANT, "Two calls.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, json.dumps(RICH[0][1])).with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
            Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), "ok")
            .with_channel("commentary").with_recipient("assistant"),
            Message.from_role_and_content(Role.ASSISTANT, json.dumps(RICH[1][1])).with_channel("commentary")
            .with_recipient("functions.run.cmd").with_content_type("json")]
    tokens = encoding().render_conversation(Conversation.from_messages(msgs))
    text = encoding().decode(tokens)
    first = text.index("<|start|>assistant") + len("<|start|>assistant")
    turn = text[first:text.index("<|start|>functions.")]
    assert _choice(None, turn) == {"reasoning": "Two calls.", "content": "", "calls": [RICH[0]]}, turn
    second = text[text.rindex("<|start|>assistant") + len("<|start|>assistant"):]
    assert _choice(None, second)["calls"] == [RICH[1]], second
    garbled = turn.replace("<|message|>{", "<|message|>{{")
    assert _choice(None, garbled)["calls"] == []  # not JSON: content, nothing lost
