"""SIGTERM drains: /ready turns 503, new requests get 503 + Retry-After, requests in flight
finish, and the process exits 0."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.server.conftest import start_server
from tests.server.test_errors import assert_error


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    s = start_server(["--max-model-len", "1024", "--num-kv-blocks", "256", "--drain-timeout", "60"], tmp_path)
    try:
        results: dict[str, object] = {}
        first_chunk = threading.Event()

        def streaming() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=s.url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_chunk.set()
                results["stream"] = lines

        def plain() -> None:
            with httpx.Client(base_url=s.url, timeout=120) as c:
                results["plain"] = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 300,
                                                                   "ignore_eos": True})

        threads = [threading.Thread(target=streaming), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        assert first_chunk.wait(60)
        # both requests admitted before the signal (on a busy machine the plain one can still be
        # on its way in when the stream's first chunk arrives: it would then be refused, rightly)
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while not re.search(r"^vllm:num_requests_running\{[^}]*\} 2\.0$", c.get("/metrics").text, re.M):
                assert time.monotonic() < deadline, "the two requests never ran together"
                time.sleep(0.05)
        s.signal(signal.SIGTERM)
        time.sleep(0.3)
        with httpx.Client(base_url=s.url, timeout=10) as c:
            r = c.get("/ready")
            assert r.status_code == 503 and r.headers["retry-after"]
            r = c.post("/v1/completions", json={"prompt": "late", "max_tokens": 1})
            assert_error(r, 503, code="service_unavailable")
            assert int(r.headers["retry-after"]) >= 1
            assert c.get("/health").status_code == 200
        for t in threads:
            t.join(120)
        stream = results["stream"]
        assert "data: [DONE]" in stream
        assert any('"finish_reason":"length"' in line for line in stream)
        plain = results["plain"]
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 300
        assert s.proc.wait(60) == 0, s.logs()[-3000:]
    finally:
        s.stop()


def test_past_the_drain_timeout_streams_end_with_an_error_event_and_done(tmp_path: Path) -> None:
    """Hardening round 2, item 9: past --drain-timeout, streams used to be cut mid-body (clients saw
    a protocol error: no error event, no [DONE]), each left a traceback in the log, and the access
    log said 200. Now each ends with an OpenAI-shaped error event and `data: [DONE]`, a JSON
    request gets a 503, the log has one access line per request with the real outcome, and the
    process still exits 0, promptly."""
    import json

    import openai

    s = start_server(["--max-model-len", "1024", "--num-kv-blocks", "512", "--max-num-seqs", "16",
                      "--drain-timeout", "1"], tmp_path)
    try:
        results: dict[str, object] = {}
        streams = {f"completion-{k}": ("/v1/completions", {"prompt": f"Once upon a time {k}"}) for k in range(3)}
        streams |= {f"chat-{k}": ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell {k}"}]})
                    for k in range(3)}
        long = {"max_tokens": 1000, "ignore_eos": True}

        def sse(name: str, path: str, body: dict) -> None:
            try:
                with httpx.Client(base_url=s.url, timeout=120) as c, \
                        c.stream("POST", path, json={**body, **long, "stream": True}) as r:
                    results[name] = [line for line in r.iter_lines() if line]
            except Exception as e:  # a cut stream: httpx.RemoteProtocolError
                results[name] = e

        def sdk_stream() -> None:
            try:
                for _ in s.client().completions.create(model=None, prompt="The list type", stream=True,  # type: ignore[arg-type]
                                                       max_tokens=1000, extra_body={"ignore_eos": True}):
                    pass
                results["sdk"] = "finished"
            except Exception as e:
                results["sdk"] = e

        def plain() -> None:
            with httpx.Client(base_url=s.url, timeout=120) as c:
                results["plain"] = c.post("/v1/completions", json={"prompt": "Hello", **long})

        threads = [threading.Thread(target=sse, args=(name, *spec)) for name, spec in streams.items()]
        threads += [threading.Thread(target=sdk_stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while (s.metric("vllm:num_requests_running") or 0) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("vllm:num_requests_running") == len(threads)
        signalled = time.monotonic()
        s.signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert s.proc.wait(30) == 0, s.logs()[-3000:]
        assert time.monotonic() - signalled < 1 + 2 + 3  # drain timeout + the last events' grace + margin
        for name in streams:
            lines = results[name]
            assert isinstance(lines, list), (name, lines)  # not a protocol error
            assert lines[-1] == "data: [DONE]", (name, lines[-3:])
            error = json.loads(lines[-2][len("data: "):])
            assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
            assert error["error"]["code"] == "service_unavailable" and "drain timeout" in error["error"]["message"]
            assert all(json.loads(line[6:]).get("choices") is not None for line in lines[:-2])
        assert isinstance(results["sdk"], openai.APIError) and "shutting down" in str(results["sdk"]), results["sdk"]
        plain = results["plain"]
        assert_error(plain, 503, code="service_unavailable")
        logs = s.logs()
        assert "Traceback" not in logs and "Exception in ASGI application" not in logs, logs[-3000:]
        access = [line for line in logs.splitlines() if "middleware.access" in line and "POST /v1/" in line]
        assert len(access) == len(threads), access
        assert sum("200 (stream error 503)" in line for line in access) == len(streams) + 1
        assert sum(" 503 " in line for line in access) == 1  # the JSON request
    finally:
        s.stop()
