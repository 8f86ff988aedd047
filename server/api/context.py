"""Per-request facts the endpoints learn and the access log line reports."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

SCOPE_KEY = "moe_serve.request_log"


@dataclass
class RequestLog:
    request_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stream_error: int | None = None  # status of an error reported inside a stream


def request_log(request: Request) -> RequestLog:
    log = request.scope.get(SCOPE_KEY)
    if log is None:  # outside the middleware (unit tests)
        log = request.scope[SCOPE_KEY] = RequestLog()
    return log
