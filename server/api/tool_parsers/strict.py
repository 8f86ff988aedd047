"""Strict reading of the pieces of a tool call, for the one decision per output (decision.py).

Every reader takes the whole output and a position, returns what it read and where it ends,
and raises `ValueError` on anything that is not exactly well-formed: an incomplete value, a
JSON syntax error (`1.2.3`, `+1`, `"\\q"`), a duplicate key at any depth (which of two `"name"`s
would be the tool?), `NaN` / `Infinity`, a name that is not a string of letters, digits, `_`,
`.` or `-` (as tool names are, server/api/tools.py), arguments that are not a JSON object.
JSON nested too deeply for the decoder raises `RecursionError`, which callers treat the same.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from server.api.tool_parsers.json_scan import object_fields, skip_ws, value_end

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ARG_KEYS = ("arguments", "parameters")


class Call(NamedTuple):
    name: str
    arguments: str  # the JSON object's text, exactly as the model wrote it
    id: str | None = None  # the model's own call id where its format has one (Kimi K2); else a new one


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load(text: str) -> Any:
    """json.loads, refusing duplicate keys and NaN / Infinity."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def read_value(text: str, start: int) -> tuple[Any, int]:
    """The complete JSON value at `start` (after whitespace): (value, end). A number that ends
    the text counts as incomplete (it may go on): no reader here accepts a bare number anyway."""
    i = skip_ws(text, start)
    end = value_end(text, i) if i < len(text) else None
    if end is None:
        raise ValueError("incomplete JSON value")
    return load(text[i:end]), end


def read_arguments(text: str, start: int) -> tuple[str, int]:
    """The arguments object at `start` (after whitespace): (its text, end)."""
    i = skip_ws(text, start)
    value, end = read_value(text, i)
    if not isinstance(value, dict):
        raise ValueError("tool arguments must be a JSON object")
    return text[i:end], end


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError("a tool name is 1-64 letters, digits, '_', '.' or '-'")
    return name


def read_call_object(text: str, start: int) -> tuple[Call, int]:
    """A call written as one JSON object, `{"name": ..., "arguments" | "parameters": {...}}`
    (keys in any order, other keys ignored, arguments `{}` when absent) at `start` (after
    whitespace): (the call, the object's end)."""
    i = skip_ws(text, start)
    if not text.startswith("{", i):
        raise ValueError("a tool call must be a JSON object")
    value, end = read_value(text, i)
    if sum(key in value for key in ARG_KEYS) > 1:
        raise ValueError("a tool call has both arguments and parameters")
    name = check_name(value.get("name"))
    arguments = "{}"
    for key, vstart, vend in object_fields(text[:end], i)[0]:  # validated above: the slices are exact
        if key in ARG_KEYS:
            if not isinstance(value[key], dict):
                raise ValueError("tool arguments must be a JSON object")
            arguments = text[vstart:vend]
    return Call(name, arguments), end
