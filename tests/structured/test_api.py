"""Structured outputs and tool calling through the real server and the real openai client, on the
bundled model (sampled at temperature 1.0 unless said otherwise)."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from loadtest.schemas import RECORD_SCHEMA

MODEL = "tiny-mixtral"
MSG = [{"role": "user", "content": "Describe one entry of the standard library as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{2,9}$"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(structured_server) -> openai.OpenAI:
    return structured_server.client()


@pytest.fixture()
def arun(structured_server):
    """arun(fn): asyncio.run(fn(async_client)), with a client made for that event loop."""
    def run(fn):
        async def main():
            async with structured_server.async_client() as ac:
                return await fn(ac)
        return asyncio.run(main())
    return run


async def _gather(coros, limit: int = 16):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


def test_fifty_schema_requests_all_validate(arun) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD_SCHEMA, "strict": True}}

    async def run(aclient):
        return await _gather([aclient.chat.completions.create(model=MODEL, messages=MSG, response_format=fmt,
                                                              temperature=1.0, max_tokens=300) for _ in range(50)])
    results = arun(run)
    texts = [r.choices[0].message.content for r in results]
    assert all(r.choices[0].finish_reason == "stop" for r in results)
    for text in texts:
        jsonschema.validate(json.loads(text), RECORD_SCHEMA)
    assert len(set(texts)) > 10  # sampled, not one answer


def test_guided_choice_and_regex_always_hold(arun) -> None:
    choices = ["yes", "no", "it depends", "nicht wahr"]
    pattern = r"[A-Z][a-z]{1,6} [0-9]{2,4}(\.[0-9])?"

    async def run(aclient):
        c = [aclient.completions.create(model=MODEL, prompt="Answer:", max_tokens=20, temperature=1.0,
                                        extra_body={"guided_choice": choices}) for _ in range(20)]
        r = [aclient.completions.create(model=MODEL, prompt="Version:", max_tokens=20, temperature=1.0,
                                        extra_body={"guided_regex": pattern}) for _ in range(20)]
        return await _gather(c + r)
    results = arun(run)
    assert all(r.choices[0].text in choices for r in results[:20])
    assert all(re.fullmatch(pattern, r.choices[0].text) for r in results[20:]), [r.choices[0].text for r in results]
    assert all(r.choices[0].finish_reason == "stop" for r in results)


@pytest.mark.parametrize("extra,check", [
    ({"structured_outputs": {"json": RECORD_SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), RECORD_SCHEMA)),
    ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict) or 1 / 0),
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict) or 1 / 0),
    ({"structured_outputs": {"regex": "[0-9]{3}"}}, lambda t: re.fullmatch("[0-9]{3}", t) or 1 / 0),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green") or 1 / 0),
    ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]? "!"'}}, lambda t: re.fullmatch(r"x\d\d?!", t) or 1 / 0),
    ({"guided_grammar": 'root ::= ("ab" | "cd")+', "guided_decoding_backend": "xgrammar"},
     lambda t: re.fullmatch("(ab|cd)+", t) or 1 / 0),
])
def test_every_spelling_on_completions(client, extra, check) -> None:
    r = client.completions.create(model=MODEL, prompt="Data:", max_tokens=300, temperature=1.0, seed=7,
                                  extra_body=extra)
    check(r.choices[0].text)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_length_inside_the_structure(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=5, temperature=1.0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "r", "schema": RECORD_SCHEMA}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)


def test_streamed_json_equals_unstreamed(client) -> None:
    kw = dict(model=MODEL, messages=MSG, max_tokens=300, temperature=1.0, seed=11,
              response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": RECORD_SCHEMA}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
             if c.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), RECORD_SCHEMA)


def test_unconstrained_greedy_output_unchanged_by_constrained_neighbours(arun) -> None:
    plain = dict(model=MODEL, prompt="The os module provides", max_tokens=40, temperature=0.0)

    async def run(aclient):
        alone = await aclient.completions.create(**plain)
        constrained = [aclient.completions.create(model=MODEL, prompt=f"Record {i}:", max_tokens=300,
                                                  temperature=1.0, extra_body={"guided_json": RECORD_SCHEMA})
                       for i in range(8)]
        mixed = await asyncio.gather(aclient.completions.create(**plain), *constrained)
        return alone, mixed
    alone, mixed = arun(run)
    assert mixed[0].choices[0].text == alone.choices[0].text
    for r in mixed[1:]:
        jsonschema.validate(json.loads(r.choices[0].text), RECORD_SCHEMA)


def _check_calls(calls, n_min: int = 1) -> None:
    assert len(calls) >= n_min
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice(client) -> None:
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=300)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        _check_calls(r.choices[0].message.tool_calls)
    single = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=300)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_tool_choice(client) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=choice,
                                           temperature=1.0, seed=seed, max_tokens=100)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop" and len(calls) == 1 and calls[0].function.name == "get_time"
        _check_calls(calls)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_match_unstreamed(client, tool_choice) -> None:
    kw = dict(model=MODEL, messages=MSG, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=5,
              max_tokens=300)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for d in ch.delta.tool_calls or []:
            if d.id is not None:  # first delta of a call: index, id, type, name
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    assert finish == whole.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


FORCED = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", "unit": "(c|f)"\}\}\n'
          r'</tool_call>')


def test_auto_parses_the_models_tool_call_format(client) -> None:
    kw = dict(model=MODEL, messages=MSG, tools=TOOLS, temperature=1.0, seed=3, max_tokens=100,
              extra_body={"guided_regex": FORCED})  # the tiny model will not call tools on its own
    r = client.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.content is None
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    _check_calls([call])
    streamed = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [d for c in streamed for d in c.delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert streamed[-1].finish_reason == "tool_calls"
    plain = client.chat.completions.create(model=MODEL, messages=MSG, tools=TOOLS, max_tokens=10,
                                           temperature=0.0).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")


# the model's output for tool_choice "auto", forced with guided_choice: (text, a tool call?)
FORCED_AUTO = [
    ('Sure. <tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>', True),
    ('<tool_call>\n{"name": "get_weather", "name": "get_time", "arguments": {"zone": 1}}\n</tool_call>', False),
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call> and then garbage', False),
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": 1.2.3}}\n</tool_call>', False),
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": +1}}\n</tool_call>', False),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "\\q"}}\n</tool_call>', False),
    ('<tool_call>\n{"name": 5, "arguments": {}}\n</tool_call>', False),
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": 1', False),
]


@pytest.mark.parametrize("text,called", FORCED_AUTO)
def test_auto_tool_calls_streamed_equal_the_whole_answer(client, text: str, called: bool) -> None:
    """Hardening round 2, item 5: the stream used to announce a call (or emit invalid arguments with
    finish_reason "tool_calls", or lose the text) where the whole answer returned the text as content."""
    kw = dict(model=MODEL, messages=MSG, tools=TOOLS, tool_choice="auto", temperature=1.0, max_tokens=200,
              extra_body={"guided_choice": [text]})
    whole = client.chat.completions.create(**kw).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    if called:
        assert whole.finish_reason == "tool_calls" and calls and whole.message.content == text.split("<")[0]
        assert all(isinstance(json.loads(args), dict) for _, args in calls)
    else:
        assert (whole.finish_reason, calls, whole.message.content) == ("stop", [], text)
    content, streamed_calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                if d.id is not None:
                    streamed_calls[d.index] = [d.function.name, d.function.arguments or ""]
                else:
                    streamed_calls[d.index][1] += d.function.arguments
    assert (content or None, [tuple(c) for c in streamed_calls.values()], finish) == \
        (whole.message.content, calls, whole.finish_reason)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "none"},
     "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "tools[1].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}, "messages[1].tool_call_id"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "unknown_tool", "arguments": "{}"}}]}],
      "tool_choice": "none"}, "messages[1].tool_calls[0].function.name"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_input_is_a_400_naming_the_parameter(structured_server, extra, param) -> None:
    body = {"model": MODEL, "messages": MSG, "max_tokens": 5, **extra}
    r = httpx.post(structured_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert err["message"].startswith(param), err
    ok = httpx.post(structured_server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200  # nothing else affected
