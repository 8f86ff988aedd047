"""Scanning JSON that may still be arriving: where a value ends, or that it has not ended yet.

Tool-call parsers stream a call's arguments as they are generated: every fragment they send
must be a prefix of the final arguments text. These helpers find a JSON value's extent in a
text that may stop anywhere: `value_end` returns the end index of a complete value, `None`
when the text ends inside it, and raises `ValueError` on a syntax error. `object_fields` walks
an object's keys and where each value starts and (if complete) ends; `array_items` does the
same for an array's elements.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_WS = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STRUCT = re.compile(r'[{}\[\]"]')
_SCALAR = re.compile(r"[-+0-9.eE]+|true|false|null")
_SCALAR_PREFIX = re.compile(r"[-+0-9.eE]*|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?")


def skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


def string_end(s: str, i: int) -> int | None:
    """End (exclusive) of the string literal starting at s[i] == '"', None if unterminated."""
    m = _STRING.match(s, i)
    return m.end() if m else None


def value_end(s: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at s[i] (no leading whitespace)."""
    if i >= len(s):
        return None
    c = s[i]
    if c == '"':
        return string_end(s, i)
    if c in "{[":
        return _container_end(s, i)
    m = _SCALAR.match(s, i)
    if m is None:
        if _SCALAR_PREFIX.fullmatch(s, i):
            return None  # e.g. "tr" at the end of the text
        raise ValueError(f"unexpected character {c!r} at {i}")
    if m.end() == len(s):
        return None  # a number may go on
    return m.end()


def _container_end(s: str, i: int) -> int | None:
    depth = 0
    j = i
    while True:
        m = _STRUCT.search(s, j)
        if m is None:
            return None
        c, j = m.group(), m.start()
        if c == '"':
            end = string_end(s, j)
            if end is None:
                return None
            j = end
            continue
        depth += 1 if c in "{[" else -1
        j += 1
        if depth == 0:
            return j


def _items(s: str, i: int, brackets: str, read: Callable[[str, int], tuple[Any, int | None]]
           ) -> tuple[list[Any], int | None]:
    """The entries `read(s, start) -> (entry or None, end or None)` finds in the container that
    opens at s[i] with brackets[0], separated by commas, as far as the text goes; and the
    container's end (None while incomplete)."""
    if s[i] != brackets[0]:
        raise ValueError(f"expected '{brackets[0]}' at {i}")
    out: list[Any] = []
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == brackets[1]:
        return out, j + 1
    while True:
        j = skip_ws(s, j)
        if j >= len(s):
            return out, None
        entry, end = read(s, j)
        if entry is not None:
            out.append(entry)
        if end is None:
            return out, None
        j = skip_ws(s, end)
        if j >= len(s):
            return out, None
        if s[j] == brackets[1]:
            return out, j + 1
        if s[j] != ",":
            raise ValueError(f"expected ',' or '{brackets[1]}' at {j}")
        j += 1


def _field(s: str, j: int) -> tuple[tuple[str, int, int | None] | None, int | None]:
    """One `"key": value` at s[j]: ((key, value_start, value_end or None), value_end)."""
    if s[j] != '"':
        raise ValueError(f"expected a key at {j}")
    kend = string_end(s, j)
    if kend is None:
        return None, None
    key = json.loads(s[j:kend])
    j = skip_ws(s, kend)
    if j >= len(s):
        return None, None
    if s[j] != ":":
        raise ValueError(f"expected ':' at {j}")
    j = skip_ws(s, j + 1)
    vend = value_end(s, j) if j < len(s) else None
    return (key, j, vend), vend


def _item(s: str, j: int) -> tuple[tuple[int, int | None], int | None]:
    end = value_end(s, j)
    return (j, end), end


def object_fields(s: str, i: int) -> tuple[list[tuple[str, int, int | None]], int | None]:
    """Fields of the object starting at s[i] == '{': [(key, value_start, value_end or None)] as
    far as the text goes, and the object's end (None while incomplete). A key whose value has
    not started yet is listed with value_start == len(s)."""
    return _items(s, i, "{}", _field)


def array_items(s: str, i: int) -> tuple[list[tuple[int, int | None]], int | None]:
    """Elements of the array starting at s[i] == '[': [(start, end or None)], and its end."""
    return _items(s, i, "[]", _item)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (held back: it may
    become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
