"""Bad input of every kind: the status, the OpenAI error shape, a short message, and the
server still serving afterwards."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]
C, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
BIG = 2**63


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 500
    assert isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# (path, json body, expected param) -> 400
BAD_BODIES = [
    (C, {}, "prompt"),
    (C, {"prompt": 5}, "prompt"),
    (C, {"prompt": []}, "prompt"),
    (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": [[]]}, "prompt"),
    (C, {"prompt": [1, "a"]}, "prompt"),
    (C, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    (C, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (C, {"prompt": "x", "temperature": 3}, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, "top_p"),
    (C, {"prompt": "x", "top_k": -2}, "top_k"),
    (C, {"prompt": "x", "min_p": 2}, "min_p"),
    (C, {"prompt": "x", "n": 0}, "n"),
    (C, {"prompt": "x", "n": True}, "n"),
    (C, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (C, {"prompt": "x", "logprobs": -1}, "logprobs"),
    (C, {"prompt": "x", "stop": 5}, "stop"),
    (C, {"prompt": "x", "stop": [""]}, "stop"),
    (C, {"prompt": "x", "stop": ["a"] * 17}, "stop"),
    (C, {"prompt": "x", "seed": BIG}, "seed"),
    (C, {"prompt": "x", "seed": -BIG - 1}, "seed"),
    (C, {"prompt": "x", "suffix": "tail"}, "suffix"),
    (C, {"prompt": "x", "best_of": 3}, "best_of"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (C, {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    (C, {"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    (C, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    (C, {"prompt": [10**9]}, "prompt"),
    (C, {"prompt": [[1], [-5]]}, "prompt[1]"),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"999999999": 1}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": []}, "logit_bias"),
    (C, {"prompt": "x", "unknown_field": 1}, "unknown_field"),
    (C, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [5]}, "messages[0]"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                       "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].type"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
    # a tool message must answer a preceding assistant tool call (as OpenAI; issue 25 item 6)
    (CHAT, {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "assistant", "content": None,
                          "tool_calls": [{"id": "c", "type": "function"}]}]}, "messages[0].tool_calls[0].function"),
    (CHAT, {"messages": MSG, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": MSG, "logprobs": 3}, "logprobs"),
    (CHAT, {"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    (C, {"prompt": "x", "guided_regex": "(unclosed"}, "guided_regex"),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"messages": MSG, "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    # tool_choice "auto" without tools (with tools and no --tool-call-parser: text content, tests/agents)
    (CHAT, {"messages": MSG, "tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MSG, "seed": BIG}, "seed"),
    (CHAT, {"messages": MSG, "functions": []}, "functions"),
    (TOK, {}, "prompt"),
    (TOK, {"prompt": "a", "messages": MSG}, "prompt"),
    (TOK, {"prompt": 5}, "prompt"),
    (DETOK, {"tokens": [10**9]}, "tokens"),
    (DETOK, {"tokens": ["a"]}, "tokens[0]"),
    (DETOK, {}, "tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD_BODIES, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(BAD_BODIES)])
def test_bad_body(http: httpx.Client, path: str, body: dict, param: str) -> None:
    err = assert_error(http.post(path, json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param or (param == "max_tokens" and err["param"] == "max_completion_tokens"), err


def test_logit_bias_names_all_bad_keys(http: httpx.Client) -> None:
    bias = {"abc": 1, "999999999": 2, "7": "x", "8": 1.0, "-3": 1}
    err = assert_error(http.post(C, json={"prompt": "x", "logit_bias": bias}), 400, "logit_bias")
    for key in ("abc", "999999999", "7", "-3"):
        assert key in err["message"], err
    assert "'8'" not in err["message"] and " 8 " not in err["message"]


@pytest.mark.parametrize("path", [C, CHAT, TOK, DETOK])
@pytest.mark.parametrize("content,headers", [
    (b"{not json", {"content-type": "application/json"}),
    (b'{"prompt": "x",}', {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b'"a string"', {"content-type": "application/json"}),
    (b"null", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b'{"prompt": "\xff\xfe"}', {"content-type": "application/json"}),
])
def test_malformed_bodies(http: httpx.Client, path: str, content: bytes, headers: dict) -> None:
    assert_error(http.post(path, content=content, headers=headers), 400)


@pytest.mark.parametrize("path", [C, CHAT, TOK, DETOK])
@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {},
                                     {"content-type": "application/x-www-form-urlencoded"}])
def test_json_content_type_required(http: httpx.Client, path: str, headers: dict) -> None:
    """A body that is not declared JSON is refused with 415 (a web page on another origin can send
    text/plain without a CORS preflight; it must not drive a keyless local server)."""
    r = http.post(path, content=b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}',
                  headers=headers)
    assert_error(r, 415, code="unsupported_media_type")


def test_unknown_model(http: httpx.Client, client: openai.OpenAI) -> None:
    for path, body in ((C, {"prompt": "x", "model": "gpt-9"}), (CHAT, {"messages": MSG, "model": "gpt-9"}),
                       (TOK, {"prompt": "x", "model": "gpt-9"})):
        assert_error(http.post(path, json=body), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)


def test_context_length(http: httpx.Client, max_model_len: int) -> None:
    long_prompt = " hello" * (max_model_len * 2)
    err = assert_error(http.post(C, json={"prompt": long_prompt, "max_tokens": 1}), 400, code="context_length_exceeded")
    assert str(max_model_len) in err["message"]
    ids = http.post(TOK, json={"prompt": "hello world"}).json()["tokens"]
    err = assert_error(http.post(C, json={"prompt": ids, "max_tokens": max_model_len}), 400, "max_tokens",
                       "context_length_exceeded")
    assert str(max_model_len) in err["message"] and str(len(ids)) in err["message"]
    err = assert_error(http.post(CHAT, json={"messages": MSG, "max_tokens": max_model_len}), 400,
                       code="context_length_exceeded")
    err = assert_error(http.post(CHAT, json={"messages": [{"role": "user", "content": long_prompt}]}), 400,
                       "messages", "context_length_exceeded")
    # the implicit completions default (16) is capped to what is left
    fits = [ids[0]] * (max_model_len - 4)
    r = http.post(C, json={"prompt": fits, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_huge_input_not_echoed(http: httpx.Client) -> None:
    huge = "x" * 100_000
    for body in ({"prompt": "x", huge: 1}, {"prompt": "x", "model": huge},
                 {"messages": [{"role": huge, "content": "x"}]}, {"prompt": "x", "logit_bias": {huge: 1}}):
        path = CHAT if "messages" in body else C
        r = http.post(path, json=body)
        assert r.status_code in (400, 404)
        assert len(r.text) < 1500, r.text[:200]


def test_wrong_method_and_unknown_route(http: httpx.Client) -> None:
    for method, path in (("GET", C), ("GET", CHAT), ("PUT", TOK), ("DELETE", "/v1/models"), ("POST", "/health")):
        assert_error(http.request(method, path), 405, code="method_not_allowed")
    for path in ("/v1/nothing", "/v2/completions", "/v1/completions/extra"):  # "/": the web UI (tests/ui)
        assert_error(http.get(path), 404, code="not_found")
        assert_error(http.post(path, json={}), 404)


def test_body_too_large(server, http: httpx.Client) -> None:
    big = b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
    assert_error(http.post(C, content=big, headers={"content-type": "application/json"}), 413,
                 code="request_too_large")

    def chunked():  # no Content-Length: counted while streaming in
        for _ in range(6):
            yield b"a" * 2**20

    r = http.post(C, content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413)


def test_oversized_headers_are_a_clean_4xx(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 * 2**10) + b"\r\n\r\n")
        head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 4"), head


def test_openai_client_maps_errors(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.status_code == 400 and "role" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=MSG, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})


def test_server_alive_after_errors(http: httpx.Client) -> None:
    r = http.post(C, json={"prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200
