"""One pure-ASGI middleware around the app: Host check, auth, draining, body-size limit and
body-read timeout, in-flight count, HTTP metrics, the access log line, and a last-resort 500
(the server keeps serving).

The Host check is DNS-rebinding protection: a web page on another origin can make a browser
send requests to a server on localhost under the attacker's host name; such requests carry
that name in `Host` and are refused (400) unless it is in the allow-list.

Pure ASGI rather than `BaseHTTPMiddleware`, so streaming responses and client disconnects
pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from server.api.auth import is_exempt, key_ok
from server.api.context import SCOPE_KEY, RequestLog
from server.api.errors import (APIError, body_timeout, body_too_large, error_json_bytes, internal_error, invalid_host,
                               unauthorized, unavailable)

access_logger = logging.getLogger(f"{__name__}.access")
logger = logging.getLogger(__name__)

# Probes are logged at DEBUG so that a scraper does not flood the access log.
QUIET_PATHS = ("/health", "/ready", "/metrics")


class _ResponseState:
    def __init__(self) -> None:
        self.status = 0
        self.started = False


class APIMiddleware:
    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state  # the FastAPI app.state: config, metrics, draining, inflight
        self.allowed_hosts = state.config.effective_allowed_hosts()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        config = self.state.config
        path: str = scope.get("path", "")
        log = scope[SCOPE_KEY] = RequestLog()
        resp = _ResponseState()

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                resp.started = True
                resp.status = message["status"]
                headers = list(message.get("headers") or [])
                if log.request_id and not any(k.lower() == b"x-request-id" for k, _ in headers):
                    # errors too carry the id the server log uses for the request
                    message = {**message, "headers": headers + [(b"x-request-id", log.request_id.encode())]}
            await send(message)

        exempt = path in self.state.public_paths or is_exempt(path, config.exempt_paths)
        counted = False
        try:
            if not host_allowed(scope, self.allowed_hosts):
                await _send_error(send_wrapper, path, invalid_host())
                return
            if config.api_key and not exempt:
                headers = dict(scope.get("headers") or [])
                if not key_ok(headers.get(b"authorization"), headers.get(b"x-api-key"), config.api_key):
                    await _send_error(send_wrapper, path, unauthorized())
                    return
            if self.state.draining and not exempt:
                await _send_error(send_wrapper, path, unavailable("The server is shutting down; retry on "
                                                            "another replica."))
                return
            limit = config.max_body_bytes
            length = _content_length(scope)
            if length is not None and length > limit:
                await _send_error(send_wrapper, path, body_too_large(limit))
                return
            if not exempt:
                self.state.inflight += 1
                counted = True
            await self.app(scope, _limited(receive, limit, config.body_read_timeout), send_wrapper)
        except asyncio.CancelledError:  # the server stopped with the response unfinished (a stuck client)
            if resp.started and log.stream_error is None:
                log.stream_error = 503
            raise
        except Exception as exc:  # our bug (or a body over the limit while streaming it in)
            err = exc if isinstance(exc, APIError) else internal_error()
            if not isinstance(exc, APIError):
                logger.exception("unhandled error on %s %s", scope.get("method"), path)
            if not resp.started:
                await _send_error(send_wrapper, path, err)
            else:
                resp.status = resp.status or err.status
        finally:
            if counted:
                self.state.inflight -= 1
            elapsed = time.perf_counter() - start
            status = resp.status or 499  # nothing sent: the client went away first
            route = getattr(scope.get("route"), "path", "") or ""
            try:
                self.state.metrics.observe_http(route, scope.get("method", ""), status, elapsed)
            except Exception:
                logger.exception("observe_http failed")
            _log_access(scope, path, route, status, elapsed, log)


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def host_allowed(scope: dict[str, Any], allowed: tuple[str, ...]) -> bool:
    if "*" in allowed:
        return True
    raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
    if raw.startswith("["):  # [::1]:8000
        host = raw.split("]", 1)[0] + "]"
    else:
        host = raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw
    return host in allowed


def _limited(receive: Any, limit: int, timeout: float) -> Any:
    """Count body bytes as they arrive (chunked bodies have no Content-Length), and give the
    whole body `timeout` seconds (a slow sender holds a connection and a task: 408)."""
    seen = 0
    deadline = time.monotonic() + timeout
    body_done = False

    async def wrapped() -> dict[str, Any]:
        nonlocal seen, body_done
        if body_done:  # after the body only a disconnect can come: wait as long as it takes
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise body_timeout(timeout) from None
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise body_too_large(limit)
            body_done = not message.get("more_body", False)
        return message

    return wrapped


async def _send_error(send: Any, path: str, err: APIError) -> None:
    body = error_json_bytes(err, path)  # in the shape of the route's API
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _log_access(scope: dict[str, Any], path: str, route: str, status: int, elapsed: float,
                log: RequestLog) -> None:
    level = logging.DEBUG if path in QUIET_PATHS and status < 400 else logging.INFO
    if not access_logger.isEnabledFor(level):
        return
    if log.stream_error:
        status_text = f"{status} (stream error {log.stream_error})"
    else:
        status_text = str(status)
    fields = {"request_id": log.request_id, "method": scope.get("method"), "route": route or path[:200],
              "status": status, "prompt_tokens": log.prompt_tokens,
              "completion_tokens": log.completion_tokens, "latency_ms": round(elapsed * 1000, 1)}
    if log.stream_error:
        fields["stream_error"] = log.stream_error
    client = scope.get("client")
    if client:
        fields["client"] = f"{client[0]}:{client[1]}"
    tokens = ""
    if log.prompt_tokens is not None:
        tokens = f" prompt_tokens={log.prompt_tokens} completion_tokens={log.completion_tokens}"
    access_logger.log(level, "%s %s %s %s %.1fms%s", log.request_id or "-", scope.get("method"),
                      json.dumps(path[:200])[1:-1], status_text, elapsed * 1000, tokens, extra={"fields": fields})
