"""The requests an engine holds, and the one place a request is admitted or refused.

Both engines (native and vLLM) keep their in-flight requests here: `admit` registers one (each
with what its engine needs to deliver to it: an output queue, a sample count) or refuses it
with `EngineOverloadedError` (the API's 429) once `max_num_seqs + max_queue_len` are in
flight; `release` forgets it when its stream ends. The API asks `check` before it tokenizes a
request, so that a full server refuses cheaply, with the same rule and the same message.
Thread-safe: the native engine delivers from its engine thread.
"""

from __future__ import annotations

import threading
from typing import Any
from collections.abc import Iterator

from server.engine.errors import EngineOverloadedError


class InFlight:
    def __init__(self, max_num_seqs: int, max_queue_len: int):
        self.max_queue_len = max_queue_len
        # the running batch plus the waiting queue: more could never be scheduled in time
        self.limit = max_num_seqs + max_queue_len
        self._items: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _refusal(self, in_flight: int, more: int) -> EngineOverloadedError | None:
        if in_flight + more <= self.limit:
            return None
        return EngineOverloadedError(f"Too many requests in flight ({in_flight}); the queue limit is "
                                     f"{self.max_queue_len}. Retry later.")

    def check(self, num_requests: int = 1) -> None:
        """Raise EngineOverloadedError when `num_requests` more would not be admitted now."""
        refusal = self._refusal(len(self._items), num_requests)
        if refusal is not None:
            raise refusal

    def admit(self, request_id: str, value: Any = None) -> None:
        """Hold one more request (EngineOverloadedError past the limit; ValueError for an id
        already in flight)."""
        with self._lock:
            if request_id in self._items:
                raise ValueError(f"duplicate request id {request_id!r}")
            refusal = self._refusal(len(self._items), 1)
            if refusal is not None:
                raise refusal
            self._items[request_id] = value

    def release(self, request_id: str) -> Any:
        with self._lock:
            return self._items.pop(request_id, None)

    def get(self, request_id: str, default: Any = None) -> Any:
        with self._lock:
            return self._items.get(request_id, default)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())
