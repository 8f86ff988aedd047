"""Engine failures and our own bugs, with the in-process fake engine (the real one does not
fail on demand): the right status, the OpenAI error shape, and the app keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from server.engine.protocol import EngineDeadError
from server.engine.request import CompletionOutput, RequestOutput
from tests.server._fake_engine import FakeEngine

BODY = {"prompt": "hello", "max_tokens": 3}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ServerConfig()), base_url="http://localhost", raise_server_exceptions=False) as c:
        yield c


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_engine_exception_is_500_and_serving_continues(client: TestClient, engine: FakeEngine, monkeypatch) -> None:
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda req: (_ for _ in ()).throw(RuntimeError("boom")))
    err = error(client.post("/v1/completions", json=BODY), 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]
    monkeypatch.setattr(engine, "generate", real)
    assert client.post("/v1/completions", json=BODY).status_code == 200


def test_engine_request_error_is_500(client: TestClient, engine: FakeEngine, monkeypatch) -> None:
    async def failing(req):
        yield RequestOutput(req.request_id, [CompletionOutput(0, finish_reason="error")], finished=True,
                            error="step failed")
    monkeypatch.setattr(engine, "generate", failing)
    r = client.post("/v1/completions", json=BODY)
    message = error(r, 500)["message"]
    # the engine's own text stays in the server log; the client gets the request id to quote
    assert "step failed" not in message and r.headers["x-request-id"] in message


def test_engine_abort_is_503(client: TestClient, engine: FakeEngine, monkeypatch) -> None:
    async def aborted(req):
        yield RequestOutput(req.request_id, [CompletionOutput(0, finish_reason="abort")], finished=True)
    monkeypatch.setattr(engine, "generate", aborted)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    error(r, 503)
    assert r.headers["retry-after"]


def test_dead_engine(client: TestClient, engine: FakeEngine, monkeypatch) -> None:
    async def dead() -> None:
        raise EngineDeadError("gone")

    def gen(req):
        raise EngineDeadError("gone")

    monkeypatch.setattr(engine, "check_health", dead)
    monkeypatch.setattr(engine, "generate", gen)
    for r in (client.get("/health"), client.get("/ready"), client.post("/v1/completions", json=BODY)):
        assert "gone" not in error(r, 503)["message"]  # engine internals are logged, not answered


def test_host_header_allow_list(engine: FakeEngine) -> None:
    """DNS rebinding: bound to loopback, only loopback host names are answered by default."""
    for host, allowed, ok in (("localhost", (), True), ("127.0.0.1:8000", (), True), ("[::1]:80", (), True),
                              ("evil.example", (), False), ("evil.example:8000", (), False),
                              ("api.example", ("api.example",), True), ("localhost", ("api.example",), False),
                              ("anything", ("*",), True)):
        app = create_app(engine, ServerConfig(allowed_hosts=allowed))
        with TestClient(app, base_url=f"http://{host}", raise_server_exceptions=False) as c:
            r = c.get("/v1/models")
            if ok:
                assert r.status_code == 200, (host, allowed, r.text)
            else:
                assert error(r, 400)["code"] == "invalid_host", (host, allowed)
    with TestClient(create_app(engine, ServerConfig(host="0.0.0.0")), base_url="http://any.host") as c:
        assert c.get("/v1/models").status_code == 200  # bound to all interfaces: any host by default


def test_error_mid_stream_is_an_error_event(client: TestClient, engine: FakeEngine, monkeypatch) -> None:
    async def breaks(req):
        yield RequestOutput(req.request_id, [CompletionOutput(0, text="a", token_ids=[5])])
        raise RuntimeError("mid-stream failure")
    monkeypatch.setattr(engine, "generate", breaks)
    with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        body = r.read().decode()
    events = [e[len("data: "):] for e in body.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert client.post("/v1/completions", json=BODY).status_code == 200


def test_bug_in_the_api_layer_is_500_and_serving_continues(client: TestClient, monkeypatch) -> None:
    serving = client.app.state.serving
    monkeypatch.setattr(serving.token_text, "get", lambda tid: 1 / 0)
    err = error(client.post("/v1/completions", json={**BODY, "logprobs": 1}), 500)
    assert err["code"] == "internal_error"
    monkeypatch.undo()
    assert client.post("/v1/completions", json={**BODY, "logprobs": 1}).status_code == 200


def test_kv_blocks_freed_after_every_kind_of_end(client: TestClient, engine: FakeEngine) -> None:
    for body in (BODY, {**BODY, "stream": True}, {**BODY, "n": 3, "prompt": ["a", "b"]}):
        client.post("/v1/completions", json=body)
    assert engine.num_free_kv_blocks() == engine.num_total_kv_blocks()
    assert engine.num_unfinished_requests() == 0
