"""Small clients shared by the soak and fault tests."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx

from loadtest.loadgen import LengthDist, LoadPoint, RunConfig, run

# tiny_mixtral has a 320-token vocabulary; token 7 is kept out of normal prompts (fault poison)
TOKEN_RANGE = (10, 300)


def error_body(r: httpx.Response, status: int) -> dict[str, Any]:
    """Assert an OpenAI-shaped error answer with this status; returns its `error` object."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def completion(url: str, prompt: list[int] | str, max_tokens: int = 8, stream: bool = False, timeout: float = 60,
               **extra: Any) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream,
            **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout, trust_env=False)


def sse_events(r: httpx.Response) -> list[Any]:
    """The JSON events of an SSE body (the `[DONE]` marker as the string "[DONE]")."""
    out: list[Any] = []
    for line in r.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def load(url: str, concurrency: int, n: int, prompt_len: int | str = 16, output_len: int | str = 16,
         timeout: float = 60.0, max_duration: float = 120.0, seed: int = 0, **kw: Any) -> dict[str, Any]:
    """One closed-loop load point through the load generator; returns its summary (and requests)."""
    cfg = RunConfig(url=url, points=(LoadPoint("concurrency", concurrency),), num_requests=n,
                    prompt_len=LengthDist.parse(str(prompt_len)), output_len=LengthDist.parse(str(output_len)),
                    token_range=TOKEN_RANGE, timeout=timeout, max_duration=max_duration, warmup=0, progress=False,
                    seed=seed, **kw)
    point = asyncio.run(run(cfg))["points"][0]
    return point["summary"] | {"requests": point["requests"]}


def raw_stream_request(port: int, body: dict[str, Any], rcvbuf: int = 4096) -> socket.socket:
    """Open a streaming completion on a raw socket with a tiny receive buffer and return the socket
    without reading (the caller reads as slowly as it likes)."""
    payload = json.dumps(body).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return s
