"""One streamed request against an OpenAI-compatible server, timed per SSE chunk.

TTFT = send -> first chunk that carries a choice (a token); inter-token latency (ITL) = the gap
between consecutive such chunks (one chunk is usually one token; a server that coalesces tokens
shows fewer, longer gaps, so TPOT = (e2e - TTFT) / (tokens - 1) is reported too); e2e = send ->
`data: [DONE]`. Output tokens come from the final `usage` chunk (`stream_options.include_usage`),
else from the chunk count.

Error kinds: `http_<status>` (non-200 answer), `timeout` (the request's deadline passed),
`connection` (no HTTP answer: refused, reset, closed), `stream_error` (an error event in the
stream, a malformed event, a broken connection or no `[DONE]` after a 200).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from loadtest.loadgen.workload import RequestSpec

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    output_len: int  # asked for (max_tokens)
    start: float = 0.0  # seconds since the run's start
    ok: bool = False
    error_kind: str | None = None
    error: str | None = None
    status: int | None = None
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # seconds, one per chunk after the first
    output_tokens: int = 0
    chunks: int = 0
    aborted: bool = False  # the client closed the stream on purpose (abort_after)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


def _message(text: str, limit: int = 300) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            text = str(err.get("message"))
    except (ValueError, AttributeError):
        pass
    return text[:limit]


def _is_token_chunk(obj: dict[str, Any], chat: bool) -> bool:
    choices = obj.get("choices")
    if not choices:
        return False
    if not chat:
        return True
    delta = choices[0].get("delta") or {}
    # the role-only opening chunk of a chat stream carries no token
    return bool(delta.get("content")) or choices[0].get("finish_reason") is not None or (
        "content" in delta and "role" not in delta)


async def _sse_lines(r: httpx.Response):
    """Lines of an event stream, split on CR/LF only (as SSE says): `aiter_lines` also splits on
    U+2028, U+0085 and friends, which token text sent with `ensure_ascii=False` may contain."""
    buf = b""
    async for chunk in r.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", "replace")


async def send(client: httpx.AsyncClient, base_url: str, spec: RequestSpec, body: dict[str, Any], *,
               endpoint: str = "completions", timeout: float = 300.0, t_zero: float = 0.0,
               headers: dict[str, str] | None = None, abort_after: int | None = None) -> RequestResult:
    """Send one streaming request and time it; never raises (except on cancellation).

    `abort_after`: close the stream after that many token chunks (a client that goes away).
    """
    res = RequestResult(spec.index, spec.prompt_len, spec.output_len)
    chat = endpoint == "chat"
    t0 = time.perf_counter()
    res.start = t0 - t_zero
    got_headers = False
    done = False
    last = t0
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", base_url.rstrip("/") + PATHS[endpoint], json=body,
                                     headers=headers) as r:
                got_headers = True
                res.status = r.status_code
                if r.status_code != 200:
                    text = (await r.aread()).decode("utf-8", "replace")
                    res.error_kind, res.error = f"http_{r.status_code}", _message(text)
                    return res
                async for line in _sse_lines(r):
                    now = time.perf_counter()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        res.error_kind, res.error = "stream_error", f"malformed event: {data[:200]}"
                        continue
                    if "error" in obj and res.error_kind is None:
                        res.error_kind, res.error = "stream_error", _message(data)
                        continue
                    if _is_token_chunk(obj, chat):
                        if res.ttft is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.chunks += 1
                        if abort_after is not None and res.chunks >= abort_after:
                            res.aborted = True
                            break
                    usage = obj.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        res.output_tokens = int(usage["completion_tokens"])
    except TimeoutError:
        res.error_kind, res.error = "timeout", f"no complete answer within {timeout:g}s"
        return res
    except httpx.TimeoutException as e:
        res.error_kind, res.error = "timeout", f"{type(e).__name__}: {e}"[:300]
        return res
    except (httpx.TransportError, OSError) as e:
        res.error_kind = "stream_error" if got_headers else "connection"
        res.error = f"{type(e).__name__}: {e}"[:300]
        return res
    res.e2e = time.perf_counter() - t0
    if res.aborted:
        return res
    if res.error_kind is None and not done:
        res.error_kind, res.error = "stream_error", "the stream ended without [DONE]"
    if res.output_tokens == 0:
        res.output_tokens = res.chunks
    res.ok = res.error_kind is None
    return res
