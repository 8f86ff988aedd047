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


def _after_item(s: str, j: int, close: str) -> tuple[int | None, bool]:
    """After an object field or array item that ends at `j`: (None, True) when the text ends
    there, (position after `close`, True) when the container closes, else (the next item's
    position, False)."""
    j = skip_ws(s, j)
    if j >= len(s):
        return None, True
    if s[j] == close:
        return j + 1, True
    if s[j] != ",":
        raise ValueError(f"expected ',' or '{close}' at {j}")
    return j + 1, False


def object_fields(s: str, i: int) -> tuple[list[tuple[str, int, int | None]], int | None]:
    """Fields of the object starting at s[i] == '{': [(key, value_start, value_end or None)] as
    far as the text goes, and the object's end (None while incomplete). A key whose value has
    not started yet is listed with value_start == len(s)."""
    if s[i] != "{":
        raise ValueError("not an object")
    fields: list[tuple[str, int, int | None]] = []
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        return fields, j + 1
    n = len(s)
    while True:
        j = skip_ws(s, j)
        if j >= n:
            return fields, None
        if s[j] != '"':
            raise ValueError(f"expected a key at {j}")
        kend = string_end(s, j)
        if kend is None:
            return fields, None
        key = json.loads(s[j:kend])
        j = skip_ws(s, kend)
        if j >= n:
            return fields, None
        if s[j] != ":":
            raise ValueError(f"expected ':' at {j}")
        j = skip_ws(s, j + 1)
        vend = value_end(s, j) if j < n else None
        fields.append((key, j, vend))
        if vend is None:
            return fields, None
        j, closed = _after_item(s, vend, "}")
        if closed:
            return fields, j


def array_items(s: str, i: int) -> tuple[list[tuple[int, int | None]], int | None]:
    """Elements of the array starting at s[i] == '[': [(start, end or None)], and its end."""
    if s[i] != "[":
        raise ValueError("not an array")
    items: list[tuple[int, int | None]] = []
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "]":
        return items, j + 1
    n = len(s)
    while True:
        j = skip_ws(s, j)
        if j >= n:
            return items, None
        end = value_end(s, j)
        items.append((j, end))
        if end is None:
            return items, None
        j, closed = _after_item(s, end, "]")
        if closed:
            return items, j


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (held back: it may
    become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
