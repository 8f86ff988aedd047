"""Structured outputs and tool choices on `--engine vllm`: the same fields map onto vLLM's own
structured outputs (its xgrammar backend); the checks mirror tests/structured/test_api.py."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from loadtest.schemas import RECORD_SCHEMA
from tests.structured.test_api import BAD, FORCED, MSG, SCHEMAS, TOOLS

pytestmark = pytest.mark.vllm


def test_schema_outputs_validate(client, model_name):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD_SCHEMA}}
    texts = []
    for seed in range(8):
        r = client.chat.completions.create(model=model_name, messages=MSG, response_format=fmt, temperature=1.0,
                                           seed=seed, max_tokens=300)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        texts.append(r.choices[0].message.content)
        jsonschema.validate(json.loads(texts[-1]), RECORD_SCHEMA)
    assert len(set(texts)) > 1


def test_choice_regex_grammar_json_object(client, model_name):
    for seed in range(6):
        c = client.completions.create(model=model_name, prompt="Answer:", max_tokens=10, temperature=1.0, seed=seed,
                                      extra_body={"guided_choice": ["yes", "no", "it depends"]})
        assert c.choices[0].text in ("yes", "no", "it depends")
        r = client.completions.create(model=model_name, prompt="Id:", max_tokens=20, temperature=1.0, seed=seed,
                                      extra_body={"structured_outputs": {"regex": "[a-f]{3}-[0-9]{2}"}})
        assert re.fullmatch("[a-f]{3}-[0-9]{2}", r.choices[0].text)
    g = client.completions.create(model=model_name, prompt="x", max_tokens=20, temperature=1.0, seed=1,
                                  extra_body={"guided_grammar": 'root ::= "x" [0-9] [0-9]? "!"'})
    assert re.fullmatch(r"x\d\d?!", g.choices[0].text)
    o = client.completions.create(model=model_name, prompt="x", max_tokens=200, temperature=1.0, seed=1,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(o.choices[0].text), dict)


def test_length_inside_the_structure(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=5, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": "r", "schema": RECORD_SCHEMA}})
    assert r.choices[0].finish_reason == "length"


def test_tool_choices(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MSG, tools=TOOLS, tool_choice="required",
                                       temperature=1.0, seed=2, max_tokens=300).choices[0]
    assert r.finish_reason == "tool_calls" and r.message.tool_calls
    for call in r.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    named = client.chat.completions.create(model=model_name, messages=MSG, tools=TOOLS, temperature=1.0, seed=2,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=100).choices[0]
    (call,) = named.message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])
    auto = client.chat.completions.create(model=model_name, messages=MSG, tools=TOOLS, temperature=1.0, seed=3,
                                          max_tokens=100, extra_body={"guided_regex": FORCED}).choices[0]
    assert auto.finish_reason == "tool_calls" and auto.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize("extra,param", BAD[:12])
def test_bad_inputs_are_400s_naming_the_param(vllm_server, model_name, extra, param):
    body = {"model": model_name, "messages": MSG, "max_tokens": 5, **extra}
    r = httpx.post(vllm_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
