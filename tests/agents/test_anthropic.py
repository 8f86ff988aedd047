"""POST /v1/messages (Anthropic's Messages API) against a real server, with the `anthropic` SDK and
raw HTTP: answers, the streamed event sequence, tools (forced choices through the grammar, a tool
loop), thinking, errors in Anthropic's shape, x-api-key and bearer auth; and tool_choice auto
without a --tool-call-parser (text content, for chat completions too).

The server has an API key, `--reasoning-parser qwen3` and no tool-call parser; its model is
`long_context_model_dir` (random weights: greedy answers never end by themselves, so
max_tokens ends them; sampled ones end after a few tokens)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import skip_or_fail
from tests.server.conftest import ServerProcess, start_server

KEY = "sk-ant-test-key"
MODEL = "tiny-agent"
SERVER_ARGS = ["--served-model-name", MODEL, "--max-model-len", "65536", "--num-kv-blocks", "8192",
               "--reasoning-parser", "qwen3", "--seed", "0"]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                             "days": {"type": "integer", "minimum": 1,
                                                                      "maximum": 7}},
                            "required": ["city", "days"], "additionalProperties": False}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                             "required": ["zone"], "additionalProperties": False}}
GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the API still takes them
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def server(long_context_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(["--model", str(long_context_model_dir), *SERVER_ARGS], tmp_path_factory.mktemp("anthropic"),
                     env={"MOE_SERVE_API_KEY": KEY})
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=120) as c:
        yield c


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event; the name must be the data's `type`, as Anthropic sends."""
    events = []
    for raw in text.strip().split("\n\n"):
        lines = raw.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), raw
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name, raw
        events.append((name, data))
    return events


def assemble(events: list[tuple[str, dict]]) -> dict:
    """Check the event grammar and rebuild the message from the deltas."""
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert "error" not in names, events
    message = dict(events[0][1]["message"])
    assert message["content"] == [] and message["stop_reason"] is None
    blocks: list[dict] = []
    open_index = None
    json_parts: dict[int, str] = {}
    for name, data in events[1:-2]:
        if name == "ping":
            continue
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks), events
            open_index = data["index"]
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            assert data["index"] == open_index, events
            block, delta = blocks[open_index], data["delta"]
            kind = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "tool_use"}[delta["type"]]
            assert block["type"] == kind, (block, delta)
            if kind == "tool_use":
                json_parts[open_index] = json_parts.get(open_index, "") + delta["partial_json"]
            else:
                block[kind] += delta[kind]
        else:
            assert name == "content_block_stop" and data["index"] == open_index, events
            open_index = None
    assert open_index is None
    for i, text in json_parts.items():
        blocks[i]["input"] = json.loads(text)
    final = events[-2][1]
    message.update(content=blocks, stop_reason=final["delta"]["stop_reason"],
                   stop_sequence=final["delta"]["stop_sequence"])
    message["usage"] = {**message["usage"], "output_tokens": final["usage"]["output_tokens"]}
    return message


def without_ids(message: dict) -> dict:
    """A message minus what differs between two requests (ids)."""
    out = {k: v for k, v in message.items() if k != "id"}
    out["content"] = [{k: v for k, v in b.items() if k != "id"} for b in message["content"]]
    return out


def streamed_and_whole(http: httpx.Client, body: dict) -> tuple[dict, dict, list]:
    whole = http.post("/v1/messages", json=body)
    assert whole.status_code == 200, whole.text
    r = http.post("/v1/messages", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse_events(r.text)
    return whole.json(), assemble(events), events


# -- answers ----------------------------------------------------------------------------------------
def test_sdk_message_stop_sequences_and_count_tokens(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=USER,
                                 system="You are terse.")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None  # greedy: never ends by itself
    assert msg.usage.output_tokens == 12
    counted = client.messages.count_tokens(model=MODEL, messages=USER, system="You are terse.")
    assert counted.input_tokens == msg.usage.input_tokens > 0
    # a stop sequence taken from that answer ends the next one right before it
    text = msg.content[0].text
    stop = next(text[k:k + 3] for k in range(1, len(text) - 3) if text.index(text[k:k + 3]) > 0)
    cut = client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=USER, system="You are terse.",
                                 stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]
    # sampled (temperature 1, the default): the answer ends by itself
    ended = [client.messages.create(model=MODEL, max_tokens=200, messages=USER).stop_reason for _ in range(3)]
    assert "end_turn" in ended, ended


def test_sdk_stream(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=USER)
    with client.messages.stream(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=USER) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == whole.usage.output_tokens == 10
    assert final.usage.input_tokens == whole.usage.input_tokens


@pytest.mark.parametrize("case", ["text", "thinking", "tool", "any"])
def test_stream_adds_up_to_the_message(http: httpx.Client, case: str) -> None:
    """At temperature 0, the concatenated deltas (text, thinking, tool input JSON) are the
    non-streamed message, block for block; the events follow Anthropic's sequence."""
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "messages": USER}
    if case == "thinking":
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    elif case in ("tool", "any"):
        body.update(tools=[WEATHER, TIME], max_tokens=200,
                    tool_choice={"type": "tool", "name": "get_weather"} if case == "tool" else
                    {"type": "any", "disable_parallel_tool_use": True})  # one call: never cut by max_tokens
    whole, streamed, events = streamed_and_whole(http, body)
    assert without_ids(streamed) == without_ids(whole)
    kinds = [b["type"] for b in whole["content"]]
    assert kinds == {"text": ["text"], "thinking": ["thinking"]}.get(case, kinds)
    if case in ("tool", "any"):
        assert kinds and set(kinds) == {"tool_use"} and whole["stop_reason"] == "tool_use", whole
        assert any(d["delta"]["type"] == "input_json_delta" for n, d in events if n == "content_block_delta")
    assert [n for n, _ in events][:2] == ["message_start", "ping"]


# -- tools ------------------------------------------------------------------------------------------
def test_forced_tool_choice_makes_a_valid_call(client: anthropic.Anthropic) -> None:
    schemas = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}
    msg = client.messages.create(model=MODEL, max_tokens=200, messages=USER, tools=[WEATHER, TIME],
                                 tool_choice={"type": "tool", "name": "get_time"})
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["tool_use"]
    assert msg.content[0].name == "get_time"
    jsonschema.validate(msg.content[0].input, schemas["get_time"])
    msg = client.messages.create(model=MODEL, max_tokens=300, messages=USER, tools=[WEATHER, TIME],
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert msg.stop_reason == "tool_use" and len(msg.content) == 1, msg
    jsonschema.validate(msg.content[0].input, schemas[msg.content[0].name])


def test_tool_loop(client: anthropic.Anthropic, server: ServerProcess) -> None:
    """Call (forced), tool_result, answer (tool_choice auto: text, the server has no parser)."""
    first = client.messages.create(model=MODEL, max_tokens=200, messages=USER, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"})
    call = first.content[0]
    assert call.type == "tool_use" and call.id
    history = [*USER, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "Sunny, 21 degrees"},
                                            {"type": "text", "text": "Thanks. And tomorrow?"}]}]
    answer = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=history, tools=[WEATHER])
    assert answer.stop_reason == "max_tokens" and [b.type for b in answer.content] == ["text"]
    # the call and its result are in the prompt
    shorter = client.messages.count_tokens(model=MODEL, messages=history[:2] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": ""}, {"type": "text", "text": "Thanks. And tomorrow?"}
    ]}], tools=[WEATHER])
    assert answer.usage.input_tokens > shorter.input_tokens
    # a result for a call that was never made is refused
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=4, tools=[WEATHER], messages=[*USER, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}])
    assert "tool" in e.value.body["error"]["message"]


def test_thinking_round_trip(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=USER,
                                 thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in msg.content] == ["thinking"] and msg.content[0].thinking  # no </think> from this model
    off = client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=USER,
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]
    # the thinking block goes back in the history (with its signature) and is rendered in the prompt
    history = [*USER, {"role": "assistant", "content": msg.content}, {"role": "user", "content": "Go on."}]
    again = client.messages.create(model=MODEL, max_tokens=4, messages=history, thinking={"type": "adaptive"})
    bare = client.messages.count_tokens(model=MODEL, messages=[*USER, {"role": "assistant", "content": "x"},
                                                               {"role": "user", "content": "Go on."}])
    assert again.usage.input_tokens > bare.input_tokens


def test_ignored_fields_do_not_change_the_answer(http: httpx.Client, server: ServerProcess) -> None:
    body = {"model": MODEL, "max_tokens": 10, "temperature": 0, "messages": USER}
    extra = {"metadata": {"user_id": "u1"}, "service_tier": "auto", "context_management": {"edits": []},
             "output_config": {"effort": "low"},
             "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"},
                        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
             "tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}, "defer_loading": False, "strict": True}],
             "tool_choice": {"type": "none"}}
    plain = {**body, "system": "Be brief.", "tools": [WEATHER], "tool_choice": {"type": "none"}}
    a, b = http.post("/v1/messages", json=plain).json(), http.post("/v1/messages", json={**body, **extra}).json()
    assert without_ids(a) == without_ids(b), (a, b)
    logged = [line for line in server.logs().splitlines() if "accepted and ignored" in line]
    assert logged and all(f in "".join(logged) for f in ("metadata", "service_tier", "context_management",
                                                         "output_config.effort", "tools[].defer_loading"))
    http.post("/v1/messages", json={**body, **extra})
    assert len([line for line in server.logs().splitlines() if "accepted and ignored" in line]) == len(logged)


def test_output_format_json_schema(client: anthropic.Anthropic, http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
              "required": ["answer"], "additionalProperties": False}
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 100, "messages": USER,
                                        "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["content"][0]["text"]), schema)


# -- errors and auth ---------------------------------------------------------------------------------
def assert_anthropic_error(r: httpx.Response, status: int, kind: str, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    assert all(w in body["error"]["message"] for w in words), body


@pytest.mark.parametrize(("patch", "status", "kind", "words"), [
    ({"max_tokens": None}, 400, "invalid_request_error", ("max_tokens",)),
    ({"model": "claude-opus-4"}, 404, "not_found_error", ("claude-opus-4",)),
    ({"frobnicate": 1}, 400, "invalid_request_error", ("frobnicate",)),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "invalid_request_error",
     ("image",)),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request_error", ("tool",)),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error", ("nope",)),
    ({"tools": [WEATHER], "tool_choice": {"type": "any"}, "thinking": {"type": "enabled", "budget_tokens": 100}},
     400, "invalid_request_error", ("thinking",)),
    ({"tools": [{"name": "t", "input_schema": {"type": "string"}}]}, 400, "invalid_request_error", ("input_schema",)),
    ({"temperature": 1.5}, 400, "invalid_request_error", ("temperature",)),
    ({"messages": [*USER, {"role": "assistant", "content": "The weather is"}]}, 400, "invalid_request_error",
     ("prefill",)),
    ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, 400, "invalid_request_error",
     ("mcp_servers",)),
])
def test_errors(http: httpx.Client, patch: dict, status: int, kind: str, words: tuple) -> None:
    body = {"model": MODEL, "max_tokens": 4, "messages": USER, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    for stream in (False, True):  # refused before any event
        assert_anthropic_error(http.post("/v1/messages", json={**body, "stream": stream}), status, kind, *words)


def test_error_shapes_outside_the_route(http: httpx.Client, server: ServerProcess,
                                        client: anthropic.Anthropic) -> None:
    assert_anthropic_error(http.post("/v1/messages/nope", json={}), 404, "not_found_error")
    assert_anthropic_error(http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"}),
                           400, "invalid_request_error", "JSON")
    assert_anthropic_error(http.post("/v1/messages", content=b"x", headers={"content-type": "text/plain"}),
                           415, "invalid_request_error")
    assert_anthropic_error(http.post("/v1/messages/count_tokens", json={"model": MODEL}), 400,
                           "invalid_request_error", "messages")
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="other", max_tokens=4, messages=USER)
    assert e.value.body["error"]["type"] == "not_found_error"
    # other routes keep OpenAI's shape
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 0})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_x_api_key_and_bearer(server: ServerProcess) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": USER}
    ok = [anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0),
          anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)]
    for c in ok:
        assert c.messages.create(**body).type == "message"
    for c in (anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0),
              anthropic.Anthropic(base_url=server.url, auth_token="wrong", max_retries=0)):
        with pytest.raises(anthropic.AuthenticationError) as e:
            c.messages.create(**body)
        assert e.value.body["error"]["type"] == "authentication_error"
    assert_anthropic_error(httpx.post(server.url + "/v1/messages", json=body), 401, "authentication_error",
                           "x-api-key")
    # x-api-key works on the OpenAI routes too; an OpenAI route answers in OpenAI's shape
    r = httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    r = httpx.get(server.url + "/v1/models", headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- tool_choice auto without a tool-call parser ---------------------------------------------------
def test_auto_tool_choice_without_parser_answers_text(server: ServerProcess, client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=USER, tools=[WEATHER])
    assert [b.type for b in msg.content] == ["text"] and msg.stop_reason == "max_tokens"
    chat = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "messages": USER, "max_tokens": 8, "temperature": 0, "tool_choice": "auto",
        "chat_template_kwargs": {"enable_thinking": False},  # as /v1/messages without `thinking`
        "tools": [{"type": "function", "function": {"name": WEATHER["name"], "parameters": WEATHER["input_schema"]}}]})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    assert choice["message"]["content"] == msg.content[0].text and not choice["message"].get("tool_calls")
    assert choice["finish_reason"] == "length"
    logs = server.logs()
    assert logs.count("no --tool-call-parser") == 1  # at startup
    assert logs.count("without --tool-call-parser") == 1  # at the first such request, once


# -- Claude Code ------------------------------------------------------------------------------------
CLAUDE = Path(__file__).resolve().parents[2] / ".tools" / "npm" / "node_modules" / ".bin" / "claude"
CLAUDE_TIMEOUT = 300


def run_claude(server: ServerProcess, home: Path, workdir: Path, auth: dict[str, str], *args: str
               ) -> subprocess.CompletedProcess:
    """`claude -p ...` against the server: its own HOME (no user config), every model name mapped
    to the served one, telemetry, updates and other non-essential traffic off."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "ANTHROPIC_BASE_URL": server.url,
           "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL, "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
           "ANTHROPIC_DEFAULT_SONNET_MODEL": MODEL, "ANTHROPIC_DEFAULT_OPUS_MODEL": MODEL,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_ERROR_REPORTING": "1", **auth}
    return subprocess.run([str(CLAUDE), "-p", *args, "--output-format", "json"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=CLAUDE_TIMEOUT, check=False)


def test_claude_code_print_mode(server: ServerProcess, tmp_path: Path) -> None:
    """Claude Code completes a prompt (x-api-key) and continues the conversation (bearer token):
    exit 0, no API error, every request it sent answered 200. What it sent (one summary line per
    request, the access log) and what it printed are kept in `artifacts`."""
    if not CLAUDE.exists():
        skip_or_fail(f"Claude Code is not installed at {CLAUDE} (bash scripts/install_agents.sh)")
    artifacts, home, workdir = tmp_path / "artifacts", tmp_path / "home", tmp_path / "work"
    for d in (artifacts, home, workdir):
        d.mkdir()
    (workdir / "notes.txt").write_text("moe-serve test workspace\n")
    start = len(server.logs())
    runs = [("x-api-key", {"ANTHROPIC_API_KEY": KEY}, ["Read notes.txt and say what it is about."]),
            ("bearer", {"ANTHROPIC_AUTH_TOKEN": KEY}, ["--continue", "Now summarise it in one word."])]
    for name, auth, args in runs:
        p = run_claude(server, home, workdir, auth, *args)
        (artifacts / f"claude-{name}.out").write_text(f"rc={p.returncode}\n{p.stdout}\n--- stderr\n{p.stderr}")
        where = f"(artifacts: {artifacts})"
        assert p.returncode == 0, f"claude ({name}) exited {p.returncode} {where}: {p.stdout[-1500:]} {p.stderr[-1500:]}"
        result = json.loads(p.stdout)
        assert result["is_error"] is False and result.get("api_error_status") is None, (result, where)
    sent = server.logs()[start:]
    (artifacts / "server.log").write_text(sent)
    requests = [line.split("request: ", 1)[1] for line in sent.splitlines() if "/v1/messages request: " in line]
    access = [line for line in sent.splitlines() if "server.api.middleware.access" in line]
    (artifacts / "requests.txt").write_text("\n".join(requests + ["", *access]) + "\n")
    where = f"(artifacts: {artifacts})"
    assert requests and all(" 200 " in line for line in access if "/v1/messages" in line), where
    assert any("tools=0 " not in r for r in requests), where  # its tool definitions reached the template
    # the second run sent the first conversation back: several turns, the assistant's among them
    assert any("(usau" in r for r in requests), where
    # (a wrong key: 401, test_x_api_key_and_bearer; Claude Code retries those for minutes)
