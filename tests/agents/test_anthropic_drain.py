"""A /v1/messages stream that fails after it started ends with Anthropic's `error` event (no
`message_stop`): here the server's SIGTERM drain ends a generation still running at its
--drain-timeout (503, `overloaded_error`), and the server still exits 0."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx

from tests.server.conftest import start_server


def test_stream_cut_by_the_drain_ends_with_an_error_event(long_context_model_dir: Path, tmp_path: Path) -> None:
    s = start_server(["--model", str(long_context_model_dir), "--served-model-name", "tiny-agent",
                      "--max-model-len", "8192", "--drain-timeout", "1"], tmp_path)
    try:
        events: list[tuple[str, dict]] = []
        started = threading.Event()

        def read() -> None:
            body = {"model": "tiny-agent", "max_tokens": 8000, "temperature": 0, "stream": True,  # greedy: no end
                    "messages": [{"role": "user", "content": "Tell me a long story."}]}
            with httpx.Client(base_url=s.url, timeout=120) as c, c.stream("POST", "/v1/messages", json=body) as r:
                name = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        events.append((name, json.loads(line[6:])))
                        if name == "content_block_delta":
                            started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(120), events
        s.signal(signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive()
        names = [n for n, _ in events]
        assert names[:2] == ["message_start", "ping"] and names[-1] == "error", names[-5:]
        assert "message_stop" not in names and "message_delta" not in names
        assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": events[-1][1]["error"]["message"]}}
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
