"""SSE streaming exactly as OpenAI streams, stream == non-stream for a seed, and client
disconnects (single and amid concurrent load) aborting their engine requests."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess

CHAT = [{"role": "user", "content": "Tell me a story."}]
PROMPT = "Once upon a time"


def sse_events(r: httpx.Response) -> list[dict | str]:
    """Parse an SSE body strictly: `data: ...` lines separated by blank lines, ends with [DONE]."""
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events: list[dict | str] = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block[:100]
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events


def test_chat_stream_shape(http: httpx.Client) -> None:
    body = {"messages": CHAT, "max_tokens": 5, "n": 2, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 2
    assert all(c["usage"] is None for c in chunks[:-1])
    for idx in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == idx]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(m["finish_reason"] is None for m in mine[:-1])
        assert mine[-1]["finish_reason"] in ("stop", "length") and mine[-1]["delta"] == {}
        assert all("role" not in m["delta"] for m in mine[1:])


def test_completion_stream_shape(http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "echo": True, "logprobs": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)  # echo comes first
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all(c["usage"] is not None for c in chunks)  # continuous usage
    offsets = [o for c in chunks[:-1] for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_stream_without_include_usage_has_no_usage(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "stream": True}) as r:
        events = sse_events(r)
    assert all("usage" not in c for c in events[:-1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_equals_non_stream_completions(client: openai.OpenAI, model_name: str, temperature: float) -> None:
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=12, seed=42, temperature=temperature, n=2, logprobs=1)
    full = client.completions.create(**kw)
    streamed = {0: "", 1: ""}
    reasons = {}
    tokens = {0: [], 1: []}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens if c.logprobs else []
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    for c in full.choices:
        assert streamed[c.index] == c.text
        assert reasons[c.index] == c.finish_reason
        assert tokens[c.index] == c.logprobs.tokens


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_stream_equals_non_stream_chat(client: openai.OpenAI, model_name: str, temperature: float) -> None:
    kw = dict(model=model_name, messages=CHAT, max_tokens=12, seed=7, temperature=temperature, logprobs=True,
              top_logprobs=2)
    full = client.chat.completions.create(**kw)
    text, reason, lp = "", None, []
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            lp += c.logprobs.content if c.logprobs and c.logprobs.content else []
            reason = c.finish_reason or reason
    assert text == full.choices[0].message.content
    assert reason == full.choices[0].finish_reason
    assert [e.token for e in lp] == [e.token for e in full.choices[0].logprobs.content]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


IDLE_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")


def idle_gauges(server: ServerProcess) -> dict[str, float | None]:
    return {name: server.metric(name) for name in IDLE_GAUGES}


def wait_idle(server: ServerProcess, timeout: float = 15.0, poke_after: float = 2.0) -> dict[str, float | None]:
    """Poll /metrics until the KV cache is empty and nothing runs or waits.

    The engine publishes its gauges once per step, so after an abort with nothing else to do
    they can lag; past `poke_after` seconds a one-token request makes the engine step (and
    publish) again. A leaked request would still show up: its blocks stay in use."""
    deadline = time.monotonic() + timeout
    poke_at = time.monotonic() + poke_after
    seen: dict[str, float | None] = {}
    while time.monotonic() < deadline:
        seen = idle_gauges(server)
        if all(v == 0 for v in seen.values()):
            return seen
        if time.monotonic() > poke_at:
            httpx.post(server.url + "/v1/completions", json={"prompt": "poke", "max_tokens": 1}, timeout=30)
            poke_at = time.monotonic() + 1.0
        time.sleep(0.2)
    raise AssertionError(f"server not idle after {timeout}s: {seen}")


def generated_tokens(server: ServerProcess) -> float:
    return server.metric("vllm:generation_tokens_total") or 0.0


def test_disconnect_mid_stream_aborts_and_frees_kv(server: ServerProcess, max_model_len: int) -> None:
    max_tokens = max_model_len - 16
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    before = generated_tokens(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(5)]  # two tokens (events are separated by blank lines)
            assert sum(line.startswith("data: {") for line in got) >= 2
        # leaving the block closes the connection mid-stream
    wait_idle(server)
    generated = generated_tokens(server) - before
    assert generated < max_tokens * 0.6, f"{generated} of {max_tokens} tokens generated: not aborted?"


def test_disconnect_while_waiting_for_a_non_streamed_response_aborts(server: ServerProcess,
                                                                   max_model_len: int) -> None:
    max_tokens = max_model_len - 16
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:  # how long does a full one take?
        start = time.monotonic()
        assert c.post("/v1/completions", json=body).status_code == 200
        full_time = time.monotonic() - start
    before = generated_tokens(server)
    with httpx.Client(base_url=server.url, timeout=max(0.05, full_time * 0.2)) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post("/v1/completions", json=body)
    wait_idle(server)
    generated = generated_tokens(server) - before
    assert generated < max_tokens * 0.8, f"{generated} of {max_tokens} tokens generated: not aborted?"


def test_concurrent_requests_amid_abandoned_streams(server: ServerProcess) -> None:
    async def full(c: httpx.AsyncClient, i: int) -> dict:
        if i % 2:
            r = await c.post("/v1/completions", json={"prompt": f"{PROMPT} {i}", "max_tokens": 8, "seed": i})
        else:
            r = await c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "seed": i})
        assert r.status_code == 200, r.text[:300]
        return r.json()

    async def abandoned(c: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # walk away after the first chunk

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            tasks = [full(c, i) for i in range(64)] + [abandoned(c, i) for i in range(16)]
            results = await asyncio.gather(*tasks)
        return [r for r in results if r is not None]

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(r["usage"]["completion_tokens"] >= 1 for r in results)
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in results)
    wait_idle(server)


def test_gauges_refresh_after_abort_without_traffic(server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    time.sleep(2.0)
    assert all(v == 0 for v in idle_gauges(server).values()), idle_gauges(server)
