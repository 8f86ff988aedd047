"""Reasoning output and tools through a Qwen-style chat template, on a server started with
`--reasoning-parser qwen3 --tool-call-parser hermes --chat-template <file>` over the random tiny
Mixtral whose tokenizer has `<think>`, `</think>`, `<tool_call>`, `</tool_call>` as single tokens.
The random model thinks at random: a logit bias on `</think>` makes it end its reasoning soon."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from pydantic import TypeAdapter
from transformers import AutoTokenizer

from server.api.chat_messages import render
from server.api.protocol import ChatMessage
from tests.structured.conftest import QWEN_TEMPLATE, THINK_END

MSG = [{"role": "user", "content": "What is in the os module?"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"],
          "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Find a module",
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                        "required": ["q"]}}}
HISTORY = MSG + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "os"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "os: miscellaneous operating system interfaces"}]


@pytest.fixture(scope="module")
def end_id(think_model) -> int:
    return AutoTokenizer.from_pretrained(think_model).convert_tokens_to_ids(THINK_END)


@pytest.fixture(scope="module")
def model_name(think_server) -> str:
    return httpx.get(think_server.url + "/v1/models").json()["data"][0]["id"]


def test_qwen_template_renders_tools_history_and_tool_results(think_model) -> None:
    tok = AutoTokenizer.from_pretrained(think_model)
    text = render(tok, TypeAdapter(list[ChatMessage]).validate_python(HISTORY), True, tools=[TOOL],
                  chat_template=QWEN_TEMPLATE.read_text())
    assert "<tools>\n" + json.dumps(TOOL) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "lookup", "arguments": {"q": "os"}}\n</tool_call><|im_end|>' in text
    assert "<tool_response>\nos: miscellaneous operating system interfaces\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def _raw(server, model_name, messages, **sampling) -> str:
    """The same sampling as a chat request, without any parser: completions on the rendered prompt."""
    ids = httpx.post(server.url + "/tokenize", json={"model": model_name, "messages": messages}).json()["tokens"]
    r = httpx.post(server.url + "/v1/completions", json={"model": model_name, "prompt": ids, **sampling}, timeout=60)
    return r.json()["choices"][0]["text"]


def test_reasoning_split_streamed_and_whole(think_server, model_name, end_id) -> None:
    client = think_server.client()
    sampling = dict(temperature=1.0, seed=4, max_tokens=40, logit_bias={str(end_id): 4.0})
    raw = _raw(think_server, model_name, MSG, **sampling)
    assert THINK_END in raw, raw  # the bias made the model close its reasoning
    reasoning, content = raw.removeprefix("<think>").split(THINK_END, 1)
    r = client.chat.completions.create(model=model_name, messages=MSG, **sampling)
    msg = r.choices[0].message
    assert (msg.reasoning or "", msg.content) == (reasoning, content)
    got = {"reasoning": "", "content": ""}
    for chunk in client.chat.completions.create(model=model_name, messages=MSG, stream=True, **sampling):
        for key in got:
            got[key] += getattr(chunk.choices[0].delta, key, None) or "" if chunk.choices else ""
    assert got == {"reasoning": reasoning, "content": content}
    # vLLM's name only (the older `reasoning_content` needs --legacy-reasoning-content)
    raw_msg = httpx.post(think_server.url + "/v1/chat/completions", json={"model": model_name, "messages": MSG,
                                                                          **sampling}, timeout=60).json()
    assert (raw_msg["choices"][0]["message"]["reasoning"] or "") == reasoning
    assert "reasoning_content" not in raw_msg["choices"][0]["message"]


def test_legacy_reasoning_content_sends_both_names() -> None:
    from server.api.chat import _reasoning_names

    fields = {"role": "assistant", "content": "x", "reasoning_content": "r"}
    assert _reasoning_names(fields, False) == {"role": "assistant", "content": "x", "reasoning": "r"}
    assert _reasoning_names(fields, True) == {"role": "assistant", "content": "x", "reasoning": "r",
                                              "reasoning_content": "r"}
    assert _reasoning_names({"content": "x"}, True) == {"content": "x"}


def test_structured_output_applies_after_the_reasoning(think_server, model_name, end_id) -> None:
    client = think_server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    seen_reasoning = False
    for seed in range(6):
        sampling = dict(temperature=1.0, seed=seed, max_tokens=80, logit_bias={str(end_id): 4.5})
        r = client.chat.completions.create(model=model_name, messages=MSG, response_format=fmt, **sampling)
        msg = r.choices[0].message
        jsonschema.validate(json.loads(msg.content), SCHEMA)
        assert r.choices[0].finish_reason == "stop"
        seen_reasoning |= bool(msg.reasoning)
    assert seen_reasoning  # free text before </think>, the schema after it
    off = client.chat.completions.create(model=model_name, messages=MSG, response_format=fmt, temperature=1.0,
                                         seed=1, max_tokens=60,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.reasoning is None  # thinking off: constrained from the first token
    jsonschema.validate(json.loads(off.choices[0].message.content), SCHEMA)


def test_tools_reach_the_template_and_history_is_accepted(think_server, model_name, structured_server) -> None:
    client = think_server.client()
    base = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=1)
    with_tools = client.chat.completions.create(model=model_name, messages=MSG, tools=[TOOL], tool_choice="none",
                                                max_tokens=1)
    assert with_tools.usage.prompt_tokens > base.usage.prompt_tokens + 20  # the <tools> block was rendered
    r = client.chat.completions.create(model=model_name, messages=HISTORY, tools=[TOOL], tool_choice="none",
                                       max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    # the bundled model's own template knows no tool role: its 400 names the messages
    bad = httpx.post(structured_server.url + "/v1/chat/completions",
                     json={"messages": HISTORY, "tools": [TOOL], "tool_choice": "none", "max_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_auto_tool_call_with_thinking_off(think_server, model_name) -> None:
    client = think_server.client()
    forced = r'<tool_call>\n\{"name": "lookup", "arguments": \{"q": "(os|re|sys)"\}\}\n</tool_call>'
    kw = dict(model=model_name, messages=MSG, tools=[TOOL], temperature=1.0, seed=2, max_tokens=60,
              extra_body={"guided_regex": forced, "chat_template_kwargs": {"enable_thinking": False}})
    r = client.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.tool_calls[0].function.name == "lookup"
    assert json.loads(r.message.tool_calls[0].function.arguments)["q"] in ("os", "re", "sys")
    deltas = [d for c in client.chat.completions.create(stream=True, **kw) if c.choices
              for d in c.choices[0].delta.tool_calls or []]
    assert "".join(d.function.arguments or "" for d in deltas) == r.message.tool_calls[0].function.arguments
