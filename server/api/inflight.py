"""The generations in flight, so that a SIGTERM drain that runs out of time can end them properly.

Past `--drain-timeout` the server stops. Without this, uvicorn cancelled the requests still
running: streams were cut mid-body (clients saw a protocol error, not an error event nor
`[DONE]`), each left a traceback in the log, and the access log recorded them as 200. Instead,
`expire_all` makes every registered `GenerationStream` raise the given error at its next step:
a stream then ends with the error event and `data: [DONE]` (server/api/sse.py), a JSON
request answers with the error, the engine requests are aborted, and the access log line says
`200 (stream error 503)`. A generation that registers afterwards (its prompt was still being
prepared) is expired at once.
"""

from __future__ import annotations

import weakref
from typing import Any

from server.api.errors import APIError


class InflightGenerations:
    def __init__(self) -> None:
        # weak: a stream that is dropped without closing must not stay here forever
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._expired: APIError | None = None

    def add(self, stream: Any) -> None:
        self._streams.add(stream)
        if self._expired is not None:
            stream.expire(self._expired)

    def discard(self, stream: Any) -> None:
        self._streams.discard(stream)

    def __len__(self) -> int:
        return len(self._streams)

    def expire_all(self, error: APIError) -> int:
        """End every generation in flight (and any that starts later) with `error`; how many."""
        self._expired = error
        streams = list(self._streams)
        for stream in streams:
            stream.expire(error)
        return len(streams)
