"""The in-memory response store behind `store: true`, `previous_response_id` and
`GET`/`DELETE /v1/responses/{id}`.

Each entry holds the response object and the conversation it continues (the input items of
the whole chain, then the response's output items), so that a follow-up request with
`previous_response_id` needs nothing else. Bounded three ways (flags): at most
`--responses-store-max-entries` entries, at most `--responses-store-max-bytes` bytes (the JSON
size of what an entry holds), and `--responses-store-ttl` seconds after its creation; past a
bound the oldest entries go first. An entry larger than the byte bound is not kept. Lives on
the event loop (no locks); nothing survives a restart.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object as sent
    conversation: list[dict[str, Any]]  # input items of the chain + this response's output items
    size: int
    expires: float


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> bool:
        """Keep a response (False: it alone exceeds the byte bound, nothing kept)."""
        if self.max_entries < 1 or self.ttl <= 0:
            return False
        size = len(json.dumps(response, separators=(",", ":"))) + len(json.dumps(conversation, separators=(",", ":")))
        if size > self.max_bytes:
            logger.warning("response %s not stored: %d bytes exceed --responses-store-max-bytes (%d)",
                           response.get("id"), size, self.max_bytes)
            return False
        self.delete(response["id"])
        self._expire()
        while self._entries and (len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._drop(next(iter(self._entries)))
        self._entries[response["id"]] = StoredResponse(response, conversation, size, self._clock() + self.ttl)
        self.bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        self._expire()
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        if response_id in self._entries:
            self._drop(response_id)
            return True
        return False

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id)
        self.bytes -= entry.size

    def _expire(self) -> None:
        """Entries expire in insertion order (one TTL for all), so the oldest are checked first."""
        now = self._clock()
        while self._entries:
            first_id, first = next(iter(self._entries.items()))
            if first.expires > now:
                break
            self._drop(first_id)
