"""What every tool-call parser shares: the parse result, the streaming differ, call ids.

A parser implements one method, `parse(text, final)`: given the whole output so far, it returns
the content (text that is not a tool call; while the output may still turn into a call, the
undecided tail is held back) and the calls found, each with its name (once complete) and its
arguments text so far. Successive parses of a growing text only ever extend each field, so:
- non-streaming: `extract(text)` = one final parse; a call whose name or arguments are not
  complete JSON makes the whole output plain content (as vLLM does);
- streaming: `ToolCallStream` diffs successive parses into OpenAI's deltas: content
  fragments, then per call `{index, id, type, function: {name, arguments: ""}}` once the name
  is known, then `{index, function: {arguments: fragment}}` as the arguments grow.
The concatenated streamed arguments equal the non-streamed ones (the same text, unchanged).
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.api.tool_parsers.json_scan import object_fields, partial_suffix, skip_ws, value_end

ARG_KEYS = ("arguments", "parameters")


@dataclass
class ParsedCall:
    name: str | None = None  # set once the name is complete
    arguments: str = ""  # JSON text so far (a prefix of the final text)
    complete: bool = False  # the arguments' JSON value is complete


@dataclass
class Parsed:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


def content_before(text: str, marker: str, final: bool) -> tuple[Parsed, int]:
    """(the content before the first `marker`, where it starts or -1). Without a marker, the
    whole text is content, less a tail that may still become the marker (unless final)."""
    first = text.find(marker)
    if first < 0:
        keep = len(text) if final else len(text) - partial_suffix(text, marker)
        return Parsed(content=text[:keep]), -1
    return Parsed(content=text[:first]), first


CallReader = Callable[[str, int], "tuple[ParsedCall | None, int | None]"]


def collect_calls(out: Parsed, text: str, marker: str, pos: int, read: CallReader) -> Parsed:
    """Append the calls that follow each `marker` from `pos` on: `read(text, start)` returns
    (the call or None when nothing can be read yet, where it ends or None when incomplete)."""
    while pos >= 0:
        call, end = read(text, pos + len(marker))
        if call is None:
            break
        out.calls.append(call)
        if end is None:
            break
        pos = text.find(marker, end)
    return out


def parse_marked(text: str, final: bool, marker: str, read: CallReader, call_marker: str | None = None) -> Parsed:
    """Content before the first `marker`, then the calls `read` finds after each `call_marker`
    (the same marker unless given) from there on."""
    out, first = content_before(text, marker, final)
    if first < 0:
        return out
    call_marker = call_marker or marker
    return collect_calls(out, text, call_marker, text.find(call_marker, first), read)


def read_arguments(call: ParsedCall, text: str, start: int) -> tuple[ParsedCall, int | None]:
    """The call's arguments: the JSON value at `start` (after whitespace), complete or not."""
    j = skip_ws(text, start)
    if j >= len(text):
        return call, None
    end = value_end(text, j)
    call.arguments = text[j:end] if end is not None else text[j:]
    call.complete = end is not None
    return call, end


class ToolParser:
    """Base class: subclasses set `name` and implement `parse`."""

    name = ""
    # the model's tool-call markers are special tokens: the text needs them (skip_special_tokens off)
    needs_special_tokens = False

    def parse(self, text: str, final: bool) -> Parsed:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def new_call_id() -> str:
        return "call_" + secrets.token_hex(12)

    def extract(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content or None, OpenAI tool_calls) of a finished output."""
        try:
            parsed = self.parse(text, final=True)
        except ValueError:
            return text or None, []
        calls = []
        for c in parsed.calls:
            if c.name is None or not c.complete or not _is_json(c.arguments):
                return text or None, []
            calls.append(tool_call_json(self.new_call_id(), c.name, c.arguments))
        if not calls:
            return text or None, []
        return parsed.content or None, calls


def tool_call_json(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def mistral_call_id() -> str:
    """Mistral's chat templates want 9 alphanumeric characters."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def call_from_object(s: str, start: int) -> tuple[ParsedCall, int | None]:
    """A call written as a JSON object `{"name": ..., "arguments"|"parameters": {...}}` starting
    at s[start] == '{' (keys in any order): the call so far and the object's end."""
    fields, end = object_fields(s, start)
    call = ParsedCall()
    for key, vstart, vend in fields:
        if key == "name" and vend is not None:
            name = json.loads(s[vstart:vend])
            if not isinstance(name, str):
                raise ValueError("the tool name must be a string")
            call.name = name
        elif key in ARG_KEYS and vstart < len(s):
            call.arguments = s[vstart:vend] if vend is not None else s[vstart:]
            call.complete = vend is not None
    if end is not None and call.name is not None and not call.arguments:
        call.arguments, call.complete = "{}", True  # a call without arguments
    return call, end


class ToolCallStream:
    """Turns successive parses of a growing output into OpenAI's streamed deltas."""

    def __init__(self, parse, new_id) -> None:
        self._parse = parse
        self._new_id = new_id
        self._content_sent = 0
        self._sent: list[tuple[str, int]] = []  # per started call: (id, arguments chars sent)
        self.called = False  # a call was streamed (finish_reason "tool_calls")

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(content fragment, tool-call deltas) since the previous update."""
        try:
            parsed = self._parse(text, final)
        except ValueError:  # malformed call: what was sent stays; nothing more is parsed
            return "", []
        content = parsed.content[self._content_sent:] if not self._sent else ""
        self._content_sent = max(self._content_sent, len(parsed.content))
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(parsed.calls):
            if call.name is None:
                break  # calls are announced in order, each once its name is complete
            if i == len(self._sent):
                call_id = self._new_id()
                self._sent.append((call_id, 0))
                self.called = True
                deltas.append({"index": i, "id": call_id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            call_id, done = self._sent[i]
            if len(call.arguments) > done:
                deltas.append({"index": i, "function": {"arguments": call.arguments[done:]}})
                self._sent[i] = (call_id, len(call.arguments))
        return content, deltas
