"""A real server with `--async-scheduling`: /version says so, and its answers over HTTP (the
OpenAI SDK as client) are those of the main server without it, streamed and not, concurrent
requests batched together, n > 1, logprobs and stop strings included."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.server.conftest import MAIN_ARGS, ServerProcess, start_server

PROMPTS = ["The list data type", "def fib(n):", "Explain the for statement.", "import os\n"]


@pytest.fixture(scope="module")
def async_server(tmp_path_factory) -> ServerProcess:
    s = start_server([*MAIN_ARGS, "--async-scheduling"], tmp_path_factory.mktemp("async-server"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


def _completions(srv: ServerProcess, model: str, stream: bool) -> list:
    client = srv.client()

    def one(i: int):
        kw = dict(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=12 + 3 * i, logprobs=2,
                  temperature=0.0 if i % 2 == 0 else 0.9, seed=100 + i, n=1 + i % 2,
                  stop=[" the"] if i == 3 else None)
        if not stream:
            r = client.completions.create(**kw)
            return sorted((c.index, c.text, c.finish_reason, c.logprobs.tokens) for c in r.choices)
        acc: dict[int, list] = {}
        for chunk in client.completions.create(stream=True, **kw):
            for c in chunk.choices:
                text, reason, toks = acc.get(c.index, ("", None, []))
                acc[c.index] = (text + c.text, c.finish_reason or reason, toks + (c.logprobs.tokens if c.logprobs else []))
        return sorted((i, *v) for i, v in acc.items())

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # batched together in the engine
        return list(pool.map(one, range(6)))


def test_async_server_answers_as_the_sync_one(async_server: ServerProcess, server: ServerProcess, model_name: str):
    v = httpx.get(async_server.url + "/version", timeout=10).json()
    assert v["async_scheduling"] is True
    assert httpx.get(server.url + "/version", timeout=10).json()["async_scheduling"] is False
    assert "async scheduling: on" in async_server.logs()
    reference = _completions(server, model_name, stream=False)
    assert _completions(async_server, model_name, stream=False) == reference
    assert _completions(async_server, model_name, stream=True) == reference
    assert any(c[2] == "length" for r in reference for c in r)
