"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`.

`sse_response` wraps an async iterator of JSON-able chunks. Errors raised while streaming
(engine failure, timeout) become one `data: {"error": {...}}` event before `[DONE]`; a client
disconnect cancels the iterator, whose own cleanup aborts the engine requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from server.api.errors import CLIENT_CLOSED_REQUEST, APIError, ClientDisconnected, internal_error

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(obj: Any) -> bytes:
    """One event: `obj` as compact JSON, or `obj` itself when it is JSON already (bytes)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"data: " + data + b"\n\n"


async def _events(chunks: AsyncIterator[dict[str, Any] | bytes], on_error: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
    except APIError as e:
        on_error(e.status)
        yield sse_event(e.body())
    except ClientDisconnected:  # the client went away mid-stream: its requests were aborted
        on_error(CLIENT_CLOSED_REQUEST)
        return
    except Exception:  # our bug: report it in-band, keep serving
        logger.exception("error while streaming a response")
        err = internal_error()
        on_error(err.status)
        yield sse_event(err.body())
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield DONE


def sse_response(chunks: AsyncIterator[dict[str, Any] | bytes], headers: dict[str, str] | None = None,
                 on_error: Any = lambda status: None) -> StreamingResponse:
    return StreamingResponse(_events(chunks, on_error), media_type="text/event-stream",
                             headers={**SSE_HEADERS, **(headers or {})})
