"""A restricted server: API key, a tiny queue (429 + Retry-After), a 0.5 s request timeout.

LONG asks for 2,000 tokens, the most the bundled model's context holds: on a fast CPU with the C
kernels the model decodes 1,000 tokens in under a second (the timeout tests need a request that is
still running when the timeout hits)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server
from tests.server.test_errors import assert_error

KEY = "sk-test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(["--max-model-len", "2048", "--max-num-seqs", "1", "--max-queue-len", "2",
                      "--request-timeout", "0.5", "--num-kv-blocks", "130", "--log-format", "json"],
                     tmp_path_factory.mktemp("restricted-server"), env={"MOE_SERVE_API_KEY": KEY})
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


def test_api_key_required(restricted: ServerProcess) -> None:
    with httpx.Client(base_url=restricted.url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            r = c.get("/v1/models", headers=headers)
            assert_error(r, 401, code="invalid_api_key")
            assert r.headers.get("www-authenticate") == "Bearer"
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 401)
        assert_error(c.get("/v1/no-such-route"), 401)  # no route discovery without a key
        for path in ("/health", "/ready", "/metrics", "/version"):
            assert c.get(path).status_code == 200, path
        assert c.get("/v1/models", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        restricted.client("wrong").models.list()
    ok = restricted.client(KEY).completions.create(model=restricted.client(KEY).models.list().data[0].id,
                                                   prompt="hi", max_tokens=1)
    assert ok.usage.completion_tokens == 1


def test_request_timeout_non_stream_is_504(restricted: ServerProcess) -> None:
    with httpx.Client(base_url=restricted.url, timeout=30, headers=AUTH) as c:
        r = c.post("/v1/completions", json=LONG)
        assert_error(r, 504, code="request_timeout")
        # and the stream variant ends with an error event, then [DONE]
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as s:
            assert s.status_code == 200
            body = s.read().decode()
        assert '"code":"request_timeout"' in body and body.endswith("data: [DONE]\n\n")
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_request_timeout_responses_api(restricted: ServerProcess) -> None:
    """/v1/responses past the timeout: a 504, and a stream that started ends with an `error`
    event, then `response.failed` (a string the schema makes fill the context keeps it going: longer
    in characters than the 1100-token context can hold, as a token may be several characters)."""
    body = {"input": "Once upon a time", "text": {"format": {"type": "json_schema", "name": "long", "schema": {
        "type": "object", "properties": {"s": {"type": "string", "minLength": 20000}}, "required": ["s"]}}}}
    with httpx.Client(base_url=restricted.url, timeout=60, headers=AUTH) as c:
        assert_error(c.post("/v1/responses", json=body), 504, code="request_timeout")
        with c.stream("POST", "/v1/responses", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            raw = s.read().decode()
        kinds = [line[len("event: "):] for line in raw.splitlines() if line.startswith("event: ")]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-2:] == ["error", "response.failed"]
        assert '"code":"request_timeout"' in raw and '"status":"failed"' in raw
        r = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1})
        assert r.status_code == 200 and r.json()["status"] in ("completed", "incomplete")


def test_queue_limit_429(restricted: ServerProcess) -> None:
    async def one(c: httpx.AsyncClient) -> httpx.Response:
        return await c.post("/v1/completions", json=LONG)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=restricted.url, timeout=60, headers=AUTH,
                                     limits=httpx.Limits(max_connections=20)) as c:
            return list(await asyncio.gather(*[one(c) for _ in range(8)]))

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    rejected = [r for r in responses if r.status_code == 429]
    assert len(rejected) >= 5, statuses  # 1 running + 2 queued fit
    for r in rejected:
        assert_error(r, 429, code="rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
    assert set(statuses) <= {429, 504, 200}, statuses
    model = restricted.client(KEY).models.list().data[0].id

    async def burst() -> None:  # the openai client raises RateLimitError for the 429s
        c = restricted.async_client(KEY)
        await asyncio.gather(*[c.completions.create(model=model, prompt="x", max_tokens=2000,
                                                    extra_body={"ignore_eos": True}) for _ in range(8)])

    with pytest.raises(openai.RateLimitError):  # the 429s come back first
        asyncio.run(burst())
    # the server recovers once the queue drains
    with httpx.Client(base_url=restricted.url, timeout=30, headers=AUTH) as c:
        for _ in range(50):
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200


def test_access_log_is_json(restricted: ServerProcess) -> None:
    import json

    lines = [json.loads(line) for line in restricted.logs().splitlines() if line.startswith("{")]
    access = [x for x in lines if x.get("logger") == "server.api.middleware.access" and x.get("route") == "/v1/completions"]
    assert access, restricted.logs()[-2000:]
    ok = [x for x in access if x["status"] == 200]
    assert ok and all(x["request_id"].startswith("cmpl-") for x in ok)
    assert all(isinstance(x["latency_ms"], (int, float)) for x in access)
    assert any(x["prompt_tokens"] and x["completion_tokens"] is not None for x in ok)
    assert KEY not in restricted.logs()
