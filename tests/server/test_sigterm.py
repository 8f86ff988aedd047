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
