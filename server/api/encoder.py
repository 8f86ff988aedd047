"""Building and serializing big responses off the event loop, in pieces.

A response with logprobs, prompt logprobs or routing can hold millions of values: building it
(pydantic validation, `model_dump`) and `json.dumps` used to run on the event loop, where one
such request froze every other one (and /health) for seconds. `ResponseEncoder.run` runs that
work on a thread of its own (not the tokenizer thread, which every request passes through).
A thread alone is not enough: the C JSON encoder and pydantic-core hold the GIL for a whole
call, so `encode_json` serializes a body as many short calls (dicts key by key, long lists
CHUNK elements at a time), letting the event loop in between; the answer is byte for byte
what `json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))` gives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 256  # list elements per json.dumps call
MAX_DEPTH = 5  # containers deeper than this are dumped in one call (each is small by then)
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


class ResponseEncoder:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the encoder thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def encode_json(obj: Any) -> bytes:
    """Compact JSON (UTF-8), built from many small `json.dumps` calls."""
    parts: list[str] = []
    _encode(obj, parts, 0)
    return "".join(parts).encode("utf-8")


def _encode(obj: Any, parts: list[str], depth: int) -> None:
    if depth >= MAX_DEPTH or not isinstance(obj, (dict, list)) or not obj:
        parts.append(_dumps(obj))
    elif isinstance(obj, dict):
        sep = "{"
        for key, value in obj.items():
            parts.append(sep + (_dumps(key) if isinstance(key, str) else _key(key)) + ":")
            _encode(value, parts, depth + 1)
            sep = ","
        parts.append("}")
    elif len(obj) <= CHUNK and any(isinstance(x, (dict, list)) for x in obj):
        sep = "["  # few elements, maybe big ones (choices): each on its own
        for x in obj:
            parts.append(sep)
            _encode(x, parts, depth + 1)
            sep = ","
        parts.append("]")
    else:  # many elements (per-token entries): CHUNK at a time
        parts.append("[")
        for k in range(0, len(obj), CHUNK):
            parts.append(("," if k else "") + _dumps(obj[k:k + CHUNK])[1:-1])
        parts.append("]")


def _key(key: Any) -> str:
    """A non-string key as json.dumps writes it, quoted (ints, floats, bools, None)."""
    return _dumps({key: 0})[1:-3]
