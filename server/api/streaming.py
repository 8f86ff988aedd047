"""What /v1/completions and /v1/chat/completions share around the engine's delta stream:
the JSON-or-SSE answer, usage accounting on stream chunks (`stream_options`), the final
usage chunk, and logging the completion token count however the stream ends. Whole answers
are built and serialized on the encoder thread (server/api/encoder.py) and arrive as bytes;
stream chunks are dicts, or bytes when a big one was serialized there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from server.api.responses import Usage, dump
from server.api.sse import sse_response
from server.engine.request import RequestOutput
from server.metrics.usage import moe_usage


def usage(prompt_tokens: int, completion_tokens: int, metrics: list[Any] | None = None) -> Usage:
    """OpenAI's usage object, plus `moe` (see server/metrics/usage.py) once the engine requests
    finished, when the engine observed their routing."""
    summary = moe_usage(metrics) if metrics else None
    extra: dict[str, Any] = {"moe": summary} if summary is not None else {}  # unset, not null, without one
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens, **extra)


def stream_usage_options(opts: Any) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) from a request's `stream_options`."""
    include = bool(opts and opts.include_usage)
    return include, include and bool(opts and opts.continuous_usage_stats)


class StreamUsage:
    """Builds one streamed response's chunks (`chunk_model` with the `base` fields) and counts
    its tokens: `usage` on every chunk when asked (null, or running totals with
    `continuous_usage_stats`), and the final usage chunk."""

    def __init__(self, chunk_model: type[BaseModel], base: dict[str, Any], prompt_tokens: int,
                 stream_options: Any) -> None:
        self.model = chunk_model
        self.base = base
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.include_usage, self.continuous = stream_usage_options(stream_options)
        self._finished: list[Any] = []  # metrics of the finished engine requests

    def observe(self, out: RequestOutput) -> None:
        """Note one engine delta (its tokens are counted by the caller, completion by completion)."""
        if out.finished:
            self._finished.append(out.metrics)

    def chunk(self, choices: list[Any], **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {**self.base, "choices": choices, **extra}
        if self.include_usage:
            fields["usage"] = usage(self.prompt_tokens, self.completion_tokens) if self.continuous else None
        return dump(self.model(**fields))

    def final(self) -> dict[str, Any] | None:
        """The last chunk: no choices, the whole usage (None unless include_usage)."""
        if not self.include_usage:
            return None
        return dump(self.model(**self.base, choices=[],
                               usage=usage(self.prompt_tokens, self.completion_tokens, self._finished)))


async def _with_usage(chunks: AsyncIterator[dict[str, Any] | bytes], state: StreamUsage,
                      log: Any) -> AsyncIterator[dict[str, Any] | bytes]:
    try:
        async for chunk in chunks:
            yield chunk
        final = state.final()
        if final is not None:
            yield final
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # the engine requests' cleanup runs now
        log.completion_tokens = state.completion_tokens


async def respond(stream: bool, log: Any, headers: dict[str, str],
                  chunks: Callable[[], tuple[AsyncIterator[dict[str, Any] | bytes], StreamUsage]],
                  collect: Callable[[], Awaitable[bytes]]) -> Response:
    """The answer of a generation endpoint: an SSE stream of `chunks()` (then the usage chunk
    and `[DONE]`; a failure mid-stream is logged on `log.stream_error`), or the collected JSON
    (`collect()`: the body's bytes)."""
    if stream:
        events, state = chunks()

        def on_error(status: int) -> None:
            log.stream_error = status

        return sse_response(_with_usage(events, state, log), headers=headers, on_error=on_error)
    return Response(await collect(), media_type="application/json", headers=headers)
