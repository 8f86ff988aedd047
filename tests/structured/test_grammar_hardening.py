"""Hardening issue 25, items 4, 6 and 8, through the real server and the openai client: schemas the
grammar backend would silently not enforce are 400s, tool edge cases, and inputs that used to
be 500s. Each test names its item."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

MODEL = "tiny-mixtral"
MSG = [{"role": "user", "content": "Describe one entry of the standard library as JSON."}]
INT = {"type": "integer"}


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


def _nothing_else_affected(server) -> None:
    ok = _post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5,
                                           "guided_choice": ["yes", "no"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no")
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


# -- item 4: keywords the backend does not enforce -------------------------------------------------
UNENFORCED = [  # the issue's list: each gave outputs failing the schema with finish_reason "stop"
    ({"allOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 5}]}, "allOf"),
    ({"type": "integer", "not": {"const": 3}}, "'not'"),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 7}}, "'if'"),
    ({"type": "array", "items": INT, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": INT, "contains": {"const": 5}, "minContains": 2}, "contains"),
    ({"type": "integer", "multipleOf": 3, "minimum": 1}, "multipleOf"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}, "maxLength"),
    ({"type": "string", "format": "regex"}, "format"),
    ({"type": "object", "properties": {"a": INT}, "required": ["b"]}, "required"),
    ({"$defs": {"x": INT}, "$ref": "#/$defs/x", "maximum": 3}, "$ref"),
    ({"anyOf": []}, "anyOf"),
    ({"type": []}, "type"),
]


@pytest.mark.parametrize("schema,keyword", UNENFORCED, ids=[k for _, k in UNENFORCED])
def test_unenforced_schema_keywords_are_400_naming_them(structured_server, schema, keyword) -> None:
    """Item 4: these were accepted and ignored (e.g. `uniqueItems` 7/8 outputs invalid)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    r = _post(structured_server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 20,
                                                          "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and keyword in err["message"], err
    assert "(at #" in err["message"] or "must not be" in err["message"] or "'type'" in err["message"], err
    _nothing_else_affected(structured_server)


def test_exact_formats_are_generated_exactly(structured_server) -> None:
    """Item 4: `format: ipv4` let leading zeros through; dates had a day 31 in every month."""
    schema = {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"},
                                               "day": {"type": "string", "format": "date"}},
              "required": ["ip", "day"], "additionalProperties": False}
    checker = jsonschema.FormatChecker(formats=("ipv4", "date"))
    for seed in range(6):
        r = structured_server.client().completions.create(model=MODEL, prompt="Address:", max_tokens=60,
                                                          temperature=1.0, seed=seed,
                                                          extra_body={"guided_json": schema})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].text), schema, format_checker=checker)


# -- item 6: tool edge cases -------------------------------------------------------------------------
def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def test_named_tool_with_non_object_parameters_is_400(structured_server) -> None:
    """Item 6: a named tool with parameters {"type": "string"} returned string arguments."""
    r = _post(structured_server, "/v1/chat/completions", {
        "model": MODEL, "messages": MSG, "max_tokens": 20, "tools": [_tool("say", {"type": "string"})],
        "tool_choice": {"type": "function", "function": {"name": "say"}}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools[0].function.parameters" and "type 'object'" in err["message"]
    _nothing_else_affected(structured_server)


def test_ref_to_the_root_inside_a_tool_means_the_tools_own_root(structured_server) -> None:
    """Item 6: with tool_choice "required", `$ref: "#"` in a tool's parameters resolved against the
    wrapper grammar (an array of calls), so nested values came out as call arrays."""
    node = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
            "required": ["v", "next"], "additionalProperties": False}
    tools = [_tool("chain", node), _tool("noop", {"type": "object", "properties": {}})]
    client = structured_server.client()
    nested = 0
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=MSG, tools=tools, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=200)
        if r.choices[0].finish_reason == "length":
            continue
        for call in r.choices[0].message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "chain":
                jsonschema.validate(args, node)
                nested += args["next"] is not None
    assert nested >= 1  # the recursion was taken (and each level is the tool's object)


def test_tool_messages_must_answer_a_preceding_call(think_server) -> None:
    """Item 6: a `tool` message with an unknown tool_call_id, or after no assistant tool call,
    got 200 (OpenAI: 400). The think server's template renders tool messages."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    user = {"role": "user", "content": "What time is it?"}
    cases = [
        ([user, {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}], "messages[1].role"),
        ([user, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_2",
                                                              "content": "12:00"}], "messages[2].tool_call_id"),
        ([user, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "1"},
          {"role": "user", "content": "and now?"}, {"role": "tool", "tool_call_id": "call_1", "content": "2"}],
         "messages[4].role"),
    ]
    tools = [_tool("get_time", {"type": "object", "properties": {}})]
    for messages, param in cases:
        r = _post(think_server, "/v1/chat/completions", {"messages": messages, "tools": tools, "tool_choice": "none",
                                                         "max_tokens": 3})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
    ok = _post(think_server, "/v1/chat/completions", {
        "tools": tools, "tool_choice": "none", "max_tokens": 3,
        "messages": [user, {"role": "assistant", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_cut_by_max_tokens_finish_with_length(structured_server, tool_choice) -> None:
    """Item 6: a forced call cut by max_tokens has arguments that are not JSON: the answer says so
    with finish_reason "length" (streamed or not, the same), as the README documents."""
    weather = _tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"], "additionalProperties": False})
    client = structured_server.client()
    kw = dict(model=MODEL, messages=MSG, tools=[weather], tool_choice=tool_choice, temperature=1.0, seed=3,
              max_tokens=24)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "length"
    calls = whole.message.tool_calls or []
    for call in calls:
        with pytest.raises(ValueError):
            json.loads(call.function.arguments)
    streamed: dict[int, str] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                streamed[d.index] = streamed.get(d.index, "") + (d.function.arguments or "")
    assert finish == "length"
    assert [streamed[i] for i in sorted(streamed)] == [c.function.arguments for c in calls]


# -- item 8: 500s that are 400s now -------------------------------------------------------------------
def _deep_schema_text(levels: int) -> str:
    return '{"type": "array", "items": ' * levels + '{"type": "integer"}' + "}" * levels


EIGHT = [
    ({"prompt": "x", "guided_json": _deep_schema_text(500)}, "/v1/completions", "guided_json"),
    ({"prompt": "x", "guided_json": _deep_schema_text(5000)}, "/v1/completions", "guided_json"),
    ({"messages": [MSG[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}]},
     "/v1/chat/completions", "messages[1].tool_calls[0].function.arguments"),
    ({"messages": MSG, "tool_choice": "required", "tools": [_tool("f", {"type": "object", "$defs": [1, 2]})]},
     "/v1/chat/completions", "tools[0].function.parameters"),
    ({"messages": MSG, "tool_choice": "required", "tools": [_tool("f", {"type": "object", "$defs": "abc"})]},
     "/v1/chat/completions", "tools[0].function.parameters"),
    ({"prompt": "x", "guided_grammar": "root ::= root"}, "/v1/completions", "guided_grammar"),
    ({"prompt": "x", "structured_outputs": {"grammar": 'root ::= "a" x\nx ::= "b" x'}}, "/v1/completions",
     "structured_outputs.grammar"),
]


@pytest.mark.parametrize("body,path,param", EIGHT, ids=[p for _, _, p in EIGHT])
def test_former_500s_are_400s_naming_the_parameter(structured_server, body, path, param) -> None:
    """Item 8: RecursionError on deep guided_json and tool-call arguments, AttributeError on
    `$defs` as a list or string, "matcher rejected token 0" on a grammar with no finite output:
    all were 500s."""
    r = _post(structured_server, path, {"model": MODEL, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err
    _nothing_else_affected(structured_server)

