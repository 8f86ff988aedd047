"""A Responses request -> the chat layer's request (messages, tools, tool_choice,
response_format, sampling); output.py goes the other way.

Input items become OpenAI chat-format message dicts, validated through the chat layer's
message type, so the chat pipeline (server/api/chat_setup.py: tool plan, structured output,
reasoning parser, chat template) serves both APIs:
- a message -> a message of its role (content parts joined as the chat layer joins them);
- consecutive `function_call` items -> one assistant message with `tool_calls` (joined to the
  assistant message right before them, if any), a `function_call_output` -> a `tool` message;
- a `reasoning` item -> `reasoning` of the next assistant message (its `content`, else its
  `summary`), or of an empty assistant message when its turn produced nothing else;
  `encrypted_content` is ignored (this server sends none);
- `instructions` -> a first `system` message (not carried over by `previous_response_id`,
  as OpenAI).
Tools: `function` tools, and `namespace` tools whose functions are shown to the template as
`<namespace>.<name>` and come back as calls with `namespace` set. Any other tool type is a 400
naming it: this server runs no hosted tools (web search, file search, code interpreter, ...).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import TypeAdapter, ValidationError

from server.api.errors import APIError, bad_request, truncate, validation_error
from server.api.protocol import ChatCompletionRequest, ChatMessage
from server.api.responses_api.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
)

_MESSAGES = TypeAdapter(list[ChatMessage])
TEXT_JOINER = "\n"
log = logging.getLogger(__name__)
_FUNCTION_KEYS = {"type", "name", "description", "parameters", "strict"}
# hosted tools OpenAI runs itself: a client may offer them (Codex offers `web_search` by default)
# but this server runs none, so they are left out of the prompt, logged once per type
HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "image_generation",
                "computer_use_preview", "local_shell", "mcp")
_hosted_logged: set[str] = set()
_NAMESPACE_KEYS = {"type", "name", "description", "tools"}


def _text(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    return TEXT_JOINER.join(getattr(p, "text", None) or getattr(p, "refusal", "") for p in parts)


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as a list of item dicts (a string input is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in body.input]


def chat_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Responses items (dicts, as stored) -> chat message dicts."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    reasoning: str | None = None
    for k, raw in enumerate(items):
        kind = raw.get("type") or "message"
        if reasoning is not None and kind != "reasoning" and kind != "function_call" and raw.get("role") != "assistant":
            # reasoning of a turn that produced nothing else: that turn, as it was
            out.append({"role": "assistant", "content": "", "reasoning": reasoning})
            reasoning = None
        if kind == "message":
            m = MessageItem.model_validate(raw)
            msg: dict[str, Any] = {"role": m.role, "content": _text(m.content)}
            if m.role == "assistant" and reasoning is not None:
                msg["reasoning"], reasoning = reasoning, None
            out.append(msg)
        elif kind == "reasoning":
            r = ReasoningItem.model_validate(raw)
            text = _text(r.content) if r.content else _text(r.summary)
            reasoning = text if reasoning is None else reasoning + TEXT_JOINER + text
        elif kind == "function_call":
            c = FunctionCallItem.model_validate(raw)
            name = f"{c.namespace}.{c.name}" if c.namespace else c.name
            call = {"id": c.call_id, "type": "function", "function": {"name": name, "arguments": c.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and (last.get("tool_calls") or reasoning is None):
                last.setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning"], reasoning = reasoning, None
                out.append(msg)
        elif kind == "function_call_output":
            o = FunctionCallOutputItem.model_validate(raw)
            out.append({"role": "tool", "tool_call_id": o.call_id, "content": _text(o.output)})
        else:  # stored items are validated; a request's too
            raise bad_request(f"input[{k}].type: unsupported item type '{truncate(str(kind), 40)}'",
                              param=f"input[{k}].type")
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]] | None, dict[str, tuple[str, str]]]:
    """(chat-format tools, {flattened name: (namespace, name)})."""
    if not tools:
        return None, {}
    out: list[dict[str, Any]] = []
    namespaced: dict[str, tuple[str, str]] = {}
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        kind = tool.get("type")
        if kind == "function":
            out.append(_function(tool, p))
        elif kind == "namespace":
            extra = sorted(set(tool) - _NAMESPACE_KEYS)
            ns, inner = tool.get("name"), tool.get("tools")
            if extra or not isinstance(ns, str) or not isinstance(inner, list) or not inner:
                raise bad_request(f"{p}: a namespace tool is {{'type': 'namespace', 'name', 'description', "
                                  f"'tools': [function tools]}}", param=p)
            for j, fn in enumerate(inner):
                if not isinstance(fn, dict) or fn.get("type") != "function":
                    kind_j = fn.get("type") if isinstance(fn, dict) else None
                    raise bad_request(f"{p}.tools[{j}]: tool type '{truncate(str(kind_j), 40)}' is not supported "
                                      f"(a namespace holds function tools here)", param=f"{p}.tools[{j}].type")
                t = _function(fn, f"{p}.tools[{j}]")
                flat = f"{ns}.{fn['name']}"
                t["function"]["name"] = flat
                namespaced[flat] = (ns, fn["name"])
                out.append(t)
        elif kind in HOSTED_TOOLS:
            if kind not in _hosted_logged:
                _hosted_logged.add(kind)
                log.warning("responses: a request offers the hosted tool %r; this server runs no hosted tools, "
                            "so it is left out (the model cannot call it; logged once)", kind)
        else:
            raise bad_request(f"{p}.type: tool type '{truncate(str(kind), 40)}' is not supported: this server runs "
                              f"no hosted tools; only 'function' (and 'namespace') tools are accepted",
                              param=f"{p}.type")
    return out or None, namespaced


def _function(tool: dict[str, Any], p: str) -> dict[str, Any]:
    extra = sorted(set(tool) - _FUNCTION_KEYS)
    if extra:
        raise bad_request(f"{p}: unknown field(s) {', '.join(extra)[:80]}", param=p)
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type" and v is not None}}


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice  # the chat layer checks the names ('none', 'auto', 'required')
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("name"), str) \
            or set(choice) - {"type", "name"}:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise bad_request(f"tool_choice: type '{truncate(kind, 40)}' is not supported (only function tools)",
                              param="tool_choice")
        raise bad_request("tool_choice: must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                          param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    js: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.description is not None:
        js["description"] = fmt.description
    if fmt.strict is not None:
        js["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": js}


def chat_request(body: ResponsesRequest, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 tool_choice: Any) -> ChatCompletionRequest:
    try:
        validated = _MESSAGES.validate_python(messages)
    except ValidationError as e:
        raise rename(validation_error(e.errors(include_url=False, include_input=False))) from None
    fields: dict[str, Any] = {"messages": validated, "stream": bool(body.stream)}
    for name, value in (("tools", tools), ("tool_choice", tool_choice), ("parallel_tool_calls", body.parallel_tool_calls),
                        ("response_format", response_format(body)), ("temperature", body.temperature),
                        ("top_p", body.top_p), ("max_completion_tokens", body.max_output_tokens)):
        if value is not None:
            fields[name] = value
    if body.reasoning is not None and body.reasoning.effort == "none":
        fields["chat_template_kwargs"] = {"enable_thinking": False}  # Qwen3-style templates; the qwen3 parser
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise rename(validation_error(e.errors(include_url=False, include_input=False))) from None


_RENAMES = (("response_format.json_schema.schema", "text.format.schema"), ("response_format", "text.format"),
            ("max_completion_tokens", "max_output_tokens"), (".function.parameters", ".parameters"),
            (".function.name", ".name"), ("tool_choice', 'function': {'name': ...}}", "tool_choice', 'name': ...}"))
_MESSAGE_INDEX = re.compile(r"\bmessages\[(\d+)\]")


def rename(err: APIError) -> APIError:
    """An error of the chat layer in the Responses API's terms (a chat message index is not an
    input item index: `input (chat message k)`)."""
    message, param = err.message, err.param
    for old, new in _RENAMES:
        message = message.replace(old, new)
        param = param.replace(old, new) if param else param
    message = _MESSAGE_INDEX.sub(r"input (chat message \1)", message).replace("messages", "input")
    param = _MESSAGE_INDEX.sub("input", param).replace("messages", "input") if param else param
    if message == err.message and param == err.param:
        return err
    return APIError(err.status, message, type=err.type, param=param, code=err.code, headers=err.headers)
