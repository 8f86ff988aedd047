"""Chat Completions compatibility (issue 29): assistant reasoning in the history reaches the
template, the OpenAI fields clients send by default are accepted and logged once, fields that
would change the output are refused by name, non-text content parts are refused by type,
`usage.prompt_tokens_details.cached_tokens` comes from the prefix cache, and schemathesis
finds POST /v1/chat/completions consistent with its schema. One real server (the bundled
model with GLM-4.5's own chat template, which renders `reasoning_content`, and the `glm45`
tool-call parser)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server

TEMPLATES = Path(__file__).resolve().parents[1] / "tool_parsers" / "templates"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def glm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(["--max-model-len", "512", "--num-kv-blocks", "256", "--block-size", "16", "--seed", "0",
                      "--chat-template", str(TEMPLATES / "glm45.jinja"), "--tool-call-parser", "glm45",
                      "--drain-timeout", "5"],
                     tmp_path_factory.mktemp("chat-compat"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


def _rendered(server: ServerProcess, messages: list[dict], **extra) -> str:
    r = httpx.post(server.url + "/tokenize", json={"messages": messages, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return httpx.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]}, timeout=60).json()["prompt"]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_assistant_reasoning_in_history_reaches_the_template(glm_server: ServerProcess, field: str) -> None:
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, field: "The user wants Paris.", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = _rendered(glm_server, history)
    assert "<think>The user wants Paris.</think>" in text  # GLM renders the turn's thinking
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>" in text
    r = httpx.post(glm_server.url + "/v1/chat/completions",
                   json={"messages": history, "tools": [TOOL], "tool_choice": "none", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    # without the reasoning the template renders an empty think block
    plain = [dict(history[0]), {k: v for k, v in history[1].items() if k != field}, history[2]]
    assert "<think></think>" in _rendered(glm_server, plain)


def test_reasoning_wins_over_reasoning_content(glm_server: ServerProcess) -> None:
    """As vLLM: `reasoning_content` is the deprecated name; when both are sent, `reasoning` is used."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning": "new name",
                                              "reasoning_content": "old name"}]
    text = _rendered(glm_server, msgs, add_generation_prompt=False)
    assert "<think>new name</think>" in text and "old name" not in text


def test_reasoning_effort_reaches_the_template(glm_server: ServerProcess) -> None:
    """vLLM passes reasoning_effort to the template, and enable_thinking = effort != "none"
    (GLM's template then ends the prompt with an empty think block)."""
    msgs = [{"role": "user", "content": "hi"}]
    assert _rendered(glm_server, msgs).endswith("<|assistant|>")
    r = httpx.post(glm_server.url + "/v1/chat/completions",
                   json={"messages": msgs, "max_tokens": 1, "reasoning_effort": "none"}, timeout=60)
    plain = httpx.post(glm_server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}, timeout=60)
    assert r.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]  # "/nothink<|assistant|>\n<think></think>"


IGNORED = {"metadata": {"app": "test"}, "store": False, "service_tier": "auto", "user": "u-1",
           "prompt_cache_key": "k", "safety_identifier": "s-1", "verbosity": "low", "modalities": ["text"]}


def test_default_client_fields_are_accepted_and_logged_once(glm_server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, **IGNORED}
    plain = httpx.post(glm_server.url + "/v1/chat/completions",
                       json={"messages": body["messages"], "max_tokens": 3, "temperature": 0}, timeout=60)
    for _ in range(2):
        r = httpx.post(glm_server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    stream = httpx.post(glm_server.url + "/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}, timeout=60)
    assert stream.status_code == 200 and stream.text.endswith("data: [DONE]\n\n")
    logs = glm_server.logs()
    for field in [*IGNORED, "stream_options.include_obfuscation"]:
        hits = re.findall(rf"request field '{re.escape(field)}' is accepted and ignored", logs)
        assert len(hits) == 1, (field, hits)


@pytest.mark.parametrize("extra, param", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities[1]"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_fields_that_would_change_the_output_are_refused_by_name(glm_server: ServerProcess, extra: dict,
                                                                 param: str) -> None:
    r = httpx.post(glm_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                  {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                                  {"type": "file", "file": {"file_id": "f"}}])
def test_non_text_content_parts_are_refused_by_type(glm_server: ServerProcess, part: dict) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    r = httpx.post(glm_server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1].type"
    assert f"content part type '{part['type']}' is not supported" in err["message"]


def test_cached_tokens_from_the_prefix_cache(glm_server: ServerProcess) -> None:
    msgs = [{"role": "user", "content": "cache me " + " ".join(f"w{i}" for i in range(60))}]
    first = httpx.post(glm_server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2},
                       timeout=60).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    second = httpx.post(glm_server.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2},
                        timeout=60).json()["usage"]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    # whole 16-token blocks of the prompt, at least one token left to compute
    assert 0 < cached < second["prompt_tokens"] and cached % 16 == 0 and cached >= second["prompt_tokens"] - 16 - 1
    chunks = httpx.post(glm_server.url + "/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}, timeout=60).text
    last = [line for line in chunks.splitlines() if line.startswith("data: {")][-1]
    assert f'"prompt_tokens_details":{{"cached_tokens":{cached}}}' in last.replace(" ", ""), last


@pytest.mark.slow  # the slow group: CI runs it (`pytest -m slow`), the default suite does not
def test_schemathesis_finds_chat_completions_consistent(glm_server: ServerProcess, tmp_path: Path) -> None:
    """The schemathesis CLI over POST /v1/chat/completions: no 5xx, no response that breaks
    its schema, and no "Schema validation mismatch" (positive cases it generated from the
    schema that the server refused)."""
    cli = Path(sys.executable).parent / "schemathesis"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    proc = subprocess.run(
        [str(cli), "run", glm_server.url + "/openapi.json", "--include-name", "POST /v1/chat/completions",
         "--max-examples", "30", "--max-time", "45", "--workers", "1",
         "--checks", "not_a_server_error,response_schema_conformance", "--generation-deterministic",
         "--no-color", "--request-timeout", "60", "--exclude-checks", "positive_data_acceptance"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    (tmp_path / "schemathesis.txt").write_text(out)
    print(out[-3000:])
    assert proc.returncode == 0, out[-4000:]
    assert "Schema validation mismatch" not in out, out[-4000:]
    assert "500" not in re.findall(r"\b5\d\d\b", out), out[-4000:]


def test_glm45_tool_calls_through_the_server(glm_server: ServerProcess) -> None:
    """The random model is made to write GLM's call format (a regex); the `glm45` parser turns
    it into tool calls, the same streamed and whole."""
    forced = (r"Checking\.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>(Paris|Rome)</arg_value>\n"
              r"</tool_call>")
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [TOOL], "tool_choice": "auto",
            "max_tokens": 120, "temperature": 1.0, "seed": 3, "guided_regex": forced}
    r = httpx.post(glm_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] == "Checking.\n"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris", "Rome")
    chunks = httpx.post(glm_server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120).text
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in chunks.splitlines()
              if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking.\n"
    args = "".join(t["function"].get("arguments", "") for d in deltas for t in d.get("tool_calls") or [])
    assert args == call["arguments"]


def test_reasoning_effort_is_logged_as_ignored_where_the_template_has_no_use_for_it(server: ServerProcess) -> None:
    """The bundled model's template uses neither reasoning_effort nor enable_thinking."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    for effort in ("low", "high"):
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "reasoning_effort": effort}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"] == plain["choices"]
    assert len(re.findall(r"request field 'reasoning_effort' is accepted and ignored", server.logs())) == 1
