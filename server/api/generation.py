"""Run one HTTP request's engine requests: submit, merge their delta streams, time out, abort.

`GenerationStream` owns the engine requests of one HTTP request (a completion with several
prompts submits several). `start()` waits until every engine request produced its first
output, so that errors the engine raises before that (overload, bad parameters, prompt too
long) become a proper HTTP status even for streaming responses. `close()` aborts whatever is
unfinished; it is shielded from cancellation, so a client that disconnects mid-stream always
frees its KV blocks. `expire(error)` ends it with that error at its next step (the SIGTERM
drain past its deadline, through server/api/inflight.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from server.api.errors import (
    APIError,
    ClientDisconnected,
    bad_request,
    internal_error,
    overloaded,
    timed_out,
    unavailable,
)
from server.engine.protocol import EngineDeadError, EngineOverloadedError, RequestTooLongError
from server.engine.request import EngineRequest, RequestOutput, SamplingParamsError

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]  # ASGI's (starlette.types.Receive)
DISCONNECTED, EXPIRED = -1, -2  # queue entries that are not an engine request's output


def engine_error_to_api(exc: BaseException) -> APIError:
    """Map what an engine raises from `generate` onto the HTTP answer."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingParamsError):
        return bad_request(exc.message, param=exc.param)
    if isinstance(exc, RequestTooLongError):
        return bad_request(str(exc), code="context_length_exceeded")
    if isinstance(exc, EngineOverloadedError):
        return overloaded(str(exc) or "Too many requests are queued; retry later.")
    if isinstance(exc, EngineDeadError):  # details go to the log, not to clients
        logger.error("engine unavailable: %s", exc)
        return unavailable("The engine is not available; retry later.")
    logger.error("engine failed a request", exc_info=(type(exc), exc, exc.__traceback__))
    return internal_error()


class GenerationStream:
    def __init__(self, engine: Any, requests: list[EngineRequest], timeout: float,
                 receive: Receive | None = None, registry: Any | None = None, trace: Any | None = None) -> None:
        self._engine = engine
        self._requests = requests
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._receive = receive
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._done: set[int] = set()  # engine requests that finished (or failed)
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._closed = False
        self._registry = registry  # an InflightGenerations, or None
        self._expired: APIError | None = None
        self._trace = trace  # a server.api.tracing.RequestTrace (--otlp-traces-endpoint), or None
        self._end_reason = "ended before it finished"  # what an unfinished request's span says

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Submit every request and wait for each one's first output (raises APIError)."""
        if self._registry is not None:
            self._registry.add(self)
        for i, req in enumerate(self._requests):
            self._tasks.append(asyncio.create_task(self._pump(i, req)))
        if self._receive is not None:
            self._watcher = asyncio.create_task(self._watch_disconnect(self._receive))
        started: set[int] = set()
        try:
            while len(started | self._done) < len(self._requests):
                i, out = await self._next()
                started.add(i)
                self._buffer.append((i, out))
        except BaseException:
            await self.close()
            raise

    def stop_watching_disconnect(self) -> None:
        """Hand disconnect detection over to the streaming response (it listens itself)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def expire(self, error: APIError) -> None:
        """End the generation with `error` at its next step (its engine requests are aborted)."""
        if self._expired is None and not self._closed:
            self._expired = error
            self._queue.put_nowait((EXPIRED, None, None))

    def _unregister(self) -> None:
        if self._registry is not None:
            self._registry.discard(self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unregister()
        if self._trace is not None:
            self._trace.fail(self._end_reason)
        with anyio.CancelScope(shield=True):
            self.stop_watching_disconnect()
            for t in self._tasks:
                t.cancel()
            for i, req in enumerate(self._requests):
                if i not in self._done:
                    try:
                        await self._engine.abort(req.request_id)
                    except Exception:  # aborting must never fail the response path
                        logger.exception("abort of %s failed", req.request_id)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def finished(self) -> bool:
        return len(self._done) == len(self._requests)

    # -- iteration ------------------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(engine request index, delta output) until every request finished."""
        try:
            while self._buffer:
                yield self._buffer.pop(0)
            while not self.finished:
                yield await self._next()
        finally:
            self.stop_watching_disconnect()
            self._unregister()
            if not self.finished:
                await self.close()

    async def _next(self) -> tuple[int, RequestOutput]:
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._end_reason = "timed out"
                await self.close()
                raise timed_out(self._timeout)
            try:  # the common case (outputs already queued) needs no timer
                i, out, exc = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    i, out, exc = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    continue
            if i == EXPIRED:
                self._end_reason = "ended by the server"
                await self.close()
                raise self._expired or unavailable("The request was ended by the server.")
            if i == DISCONNECTED:
                self._end_reason = "client disconnected"
                await self.close()
                raise ClientDisconnected()
            if exc is not None:
                self._done.add(i)
                self._end_reason = f"engine error: {type(exc).__name__}"
                await self.close()
                raise engine_error_to_api(exc)
            if out is None:  # the engine's stream ended
                if i not in self._done:
                    self._done.add(i)
                    await self.close()
                    raise internal_error("The engine ended a request without finishing it.")
                continue
            if out.finished:
                self._done.add(i)
            reasons = {o.finish_reason for o in out.outputs}
            if out.error or "error" in reasons:
                self._end_reason = "engine error"
                await self.close()
                logger.error("engine error for %s: %s", out.request_id, out.error)
                raise internal_error(f"The engine failed this request (request id {out.request_id}); "
                                     f"the server log has the details.")
            if "abort" in reasons:
                self._end_reason = "aborted by the engine"
                await self.close()
                raise unavailable("The engine aborted the request (it may be shutting down).")
            if out.finished and self._trace is not None:
                self._trace.finish(i, out.metrics, self._requests[i].sampling_params.n)
            return i, out

    async def _pump(self, i: int, req: EngineRequest) -> None:
        try:
            async for out in self._engine.generate(req):
                self._queue.put_nowait((i, out, None))
                if out.finished:
                    break
            self._queue.put_nowait((i, None, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((i, None, e))

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                self._queue.put_nowait((DISCONNECTED, None, None))
                return
