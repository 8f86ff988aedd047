"""Arguments written as key / value pairs (GLM-4.5, Qwen3-Coder, MiniMax-M2): the model writes a
string argument as its raw text and any other value as JSON (the chat templates render them
so). The request's tool schema says which is which, as in vLLM: a parameter of type `string`
keeps its text exactly; another type's text must be JSON of that value (a value that does not
parse stays a string, as vLLM keeps it); a parameter the schema does not name is JSON when it
parses as JSON and a string otherwise. Duplicate keys make the call malformed.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.strict import load


def parameter_types(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, set[str]]]:
    """{tool name: {parameter: its JSON-schema types}} of a request's tools."""
    out: dict[str, dict[str, set[str]]] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        props = (fn.get("parameters") or {}).get("properties") if isinstance(fn.get("parameters"), dict) else None
        types: dict[str, set[str]] = {}
        for key, schema in (props or {}).items() if isinstance(props, dict) else ():
            t = schema.get("type") if isinstance(schema, dict) else None
            types[key] = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
        out[fn["name"]] = types
    return out


def convert(value: str, types: set[str] | None) -> Any:
    """One argument's text -> its value."""
    if types and types <= {"string"}:
        return value
    try:
        parsed = load(value)
    except (ValueError, RecursionError):
        # Python's spellings, which templates that render values with `| string` write
        word = value.strip()
        if types and "boolean" in types and word in ("True", "False"):
            return word == "True"
        if types and "null" in types and word == "None":
            return None
        return value
    if types and "string" in types and not isinstance(parsed, (dict, list)) and json.dumps(parsed) != value.strip():
        return value
    return parsed


class Arguments:
    """The arguments of one call, in order, refusing duplicate keys."""

    def __init__(self, name: str, types: dict[str, dict[str, set[str]]]) -> None:
        self._types = types.get(name, {})
        self.values: dict[str, Any] = {}

    def add(self, key: str, text: str) -> None:
        if not key or key in self.values:
            raise ValueError("an empty or duplicate argument name")
        self.values[key] = convert(text, self._types.get(key))

    def json(self) -> str:
        return json.dumps(self.values, ensure_ascii=False)


def expect(text: str, pos: int, token: str) -> int:
    if not text.startswith(token, pos):
        raise ValueError(f"expected {token}")
    return pos + len(token)


def until(text: str, pos: int, token: str) -> tuple[str, int]:
    """(the text up to `token`, the position past it)."""
    end = text.find(token, pos)
    if end < 0:
        raise ValueError(f"expected {token}")
    return text[pos:end], end + len(token)


class TypedArgumentsParser(ToolParser):
    """A parser whose formats write arguments as text (GLM-4.5, Qwen3-Coder, MiniMax-M2): it needs
    the request's tools to tell a string parameter (kept as its text) from others (read as JSON)."""

    def __init__(self, types: dict[str, dict[str, set[str]]] | None = None) -> None:
        self.types = types or {}

    def for_tools(self, tools: list[dict[str, Any]] | None) -> ToolParser:
        return type(self)(parameter_types(tools))

