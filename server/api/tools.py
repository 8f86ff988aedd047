"""Tool calling: `tools` and `tool_choice` validated, the grammar that enforces `required` and
named choices, and the parse of their (grammar-shaped) output.

- `none`: tools are shown to the chat template, the output is plain content;
- `auto` (the default with tools): the model's own format, parsed by `--tool-call-parser`; without
  a parser the output is plain content (a warning at startup and at the first such request);
- `required`: the output is a JSON array of `{"name": <a tool>, "parameters": <its arguments>}`
  (at least one; exactly one when `parallel_tool_calls` is false), enforced by a grammar built
  from the tool schemas, so arguments always validate against their tool's schema;
- `{"type": "function", "function": {"name": X}}`: the output is X's arguments, enforced by
  X's parameter schema.
A tool's `parameters` is a JSON schema of type object (as OpenAI requires); a tool whose schema
becomes a grammar (required, named) is checked like any schema (spec.check_schema), its errors
naming `tools[i].function.parameters`. When `max_tokens` cuts such an output, the calls so far
come back with `finish_reason: "length"` and the last call's arguments are the JSON text
generated until then (not valid JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from server.api.errors import bad_request
from server.api.tool_parsers.base import Parsed, ParsedCall, call_from_object
from server.api.tool_parsers.json_scan import array_items, skip_ws
from server.engine.structured.schema_walk import rebase_refs
from server.engine.structured.spec import (
    MAX_JSON_DEPTH,
    StructuredSpec,
    StructuredSpecError,
    check_schema,
    json_depth,
    json_schema_spec,
)

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
MAX_TOOLS = 128
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # for the chat template
    mode: str  # none | auto | required | named
    named: str | None = None
    spec: StructuredSpec | None = None  # the grammar of required / named


def plan_tools(body: Any, parser_configured: bool = False) -> ToolPlan:
    tools = _validate_tools(body.tools) if body.tools else None
    choice = body.tool_choice
    if choice is None:
        mode = "auto" if tools else "none"
    elif isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice: must be 'none', 'auto', 'required' or {{'type': 'function', "
                              f"'function': {{'name': ...}}}}, not '{choice[:40]}'", param="tool_choice")
        mode = choice
    else:
        mode = "named"
    if mode != "none" and not tools:
        raise bad_request("tool_choice: needs a non-empty tools list", param="tool_choice")
    if mode == "named":
        name = _named_choice(choice)
        i = _tool_index(tools, name)
        _check_parameters(tools, [i])
        return ToolPlan(tools, mode, name, _spec(_parameters(tools[i]), "tool_choice"))
    if mode == "required":
        _check_parameters(tools, range(len(tools)))
        return ToolPlan(tools, mode, None, _spec(_required_schema(tools, body.parallel_tool_calls), "tools"))
    return ToolPlan(tools, mode)


def _validate_tools(tools: list[Any]) -> list[dict[str, Any]]:
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools: at most {MAX_TOOLS} tools; this request has {len(tools)}", param="tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise bad_request(f"{p}: a tool is {{'type': 'function', 'function': {{...}}}}", param=f"{p}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{p}.function: must be an object", param=f"{p}.function")
        unknown = sorted(set(fn) - _FUNCTION_KEYS)
        if unknown:
            raise bad_request(f"{p}.function: unknown field(s) {', '.join(unknown)[:80]}", param=f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"{p}.function.name: 1-64 letters, digits, '_', '.' or '-'", param=f"{p}.function.name")
        if name in seen:
            raise bad_request(f"{p}.function.name: duplicate tool name '{name}'", param=f"{p}.function.name")
        seen.add(name)
        if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
            raise bad_request(f"{p}.function.description: must be a string", param=f"{p}.function.description")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"{p}.function.parameters: must be a JSON schema object",
                              param=f"{p}.function.parameters")
        if params and params.get("type") != "object":  # {} or none: no parameters
            raise bad_request(f"{p}.function.parameters: must be a JSON schema of type 'object' (the arguments are "
                              f"an object), not type {str(params.get('type'))[:40]!r}", param=f"{p}.function.parameters")
    return tools


def _named_choice(choice: Any) -> str:
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str) or set(choice) - {"type", "function"}:
        raise bad_request("tool_choice: a named choice is {'type': 'function', 'function': {'name': ...}}",
                          param="tool_choice")
    return fn["name"]


def _tool_index(tools: list[dict[str, Any]], name: str) -> int:
    for i, tool in enumerate(tools):
        if tool["function"]["name"] == name:
            return i
    raise bad_request(f"tool_choice: names the function '{name[:64]}', which is not in tools", param="tool_choice")


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def _check_parameters(tools: list[dict[str, Any]], indices: Any) -> None:
    """The schemas that become a grammar: every limit and keyword check, naming the tool."""
    for i in indices:
        try:
            check_schema(_parameters(tools[i]), f"tools[{i}].function.parameters")
        except StructuredSpecError as e:
            raise bad_request(e.message, param=e.param) from None


def _required_schema(tools: list[dict[str, Any]], parallel: bool | None) -> dict[str, Any]:
    """An array of {name, parameters} objects, one alternative per tool. Each tool's schema
    moves under `$defs/tool_<i>` with its local references rebased there, so that `#` and
    `#/$defs/...` inside it still mean its own root and definitions."""
    defs: dict[str, Any] = {}
    options = []
    for i, tool in enumerate(tools):
        defs[f"tool_{i}"] = rebase_refs(_parameters(tool), f"#/$defs/tool_{i}")
        options.append({"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                         "parameters": {"$ref": f"#/$defs/tool_{i}"}},
                        "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}, "$defs": defs}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def _spec(schema: dict[str, Any], param: str) -> StructuredSpec:
    try:
        return json_schema_spec(schema, param)
    except StructuredSpecError as e:
        raise bad_request(e.message, param=e.param) from None


# -- the output of required / named choices -------------------------------------------------
def parse_named(name: str):
    """Parser of a named choice's output: the whole output is the arguments object."""
    def parse(text: str, final: bool) -> Parsed:
        start = skip_ws(text, 0)
        if start >= len(text):
            return Parsed(calls=[ParsedCall(name=name)])
        return Parsed(calls=[ParsedCall(name=name, arguments=text[start:], complete=final)])
    return parse


def parse_required(text: str, final: bool) -> Parsed:
    """Parser of `required` output: `[{"name": ..., "parameters": {...}}, ...]`."""
    start = skip_ws(text, 0)
    if start >= len(text):
        return Parsed()
    if text[start] != "[":
        raise ValueError("expected a JSON array of tool calls")
    items, _ = array_items(text, start)
    calls = []
    for item_start, _end in items:
        if text[item_start] != "{":
            raise ValueError("a tool call must be a JSON object")
        calls.append(call_from_object(text, item_start)[0])
    return Parsed(calls=calls)


def history_tool_calls(calls: list[Any], p: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, checked, with each `arguments` JSON string parsed
    into an object (chat templates render them as objects)."""
    out = []
    for j, call in enumerate(calls):
        q = f"{p}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or call.get("type", "function") != "function":
            raise bad_request(f"{q}: a tool call is {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                              param=q)
        args = fn.get("arguments", "{}")
        too_deep = False
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise bad_request(f"{q}.function.arguments: not valid JSON", param=f"{q}.function.arguments") from None
            except RecursionError:
                too_deep = True
        if too_deep or json_depth(args) > MAX_JSON_DEPTH:
            raise bad_request(f"{q}.function.arguments: nested more than {MAX_JSON_DEPTH} levels deep; the limit is "
                              f"{MAX_JSON_DEPTH}", param=f"{q}.function.arguments")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out
