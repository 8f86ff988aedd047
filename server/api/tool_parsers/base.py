"""What every tool-call parser shares: the `ToolParser` base, call ids, and the incremental
parse of grammar-shaped tool output.

`tool_choice: "auto"`: a parser (one per model format) says where the section of tool calls
starts (`section_start`, by default the format's `marker`) and reads that section strictly
(`read_calls`, raising ValueError on anything not well-formed); `decide` turns those into the
one decision both the JSON answer (`extract`) and the stream (`stream()`: a HeldToolStream)
give. The rule and why streams hold the section back: decision.py.

`required` and named choices (server/api/tools.py): their output is shaped by a grammar, so it
is parsed incrementally (`Parsed` / `ParsedCall` / `call_from_object`), and `ToolCallStream`
diffs successive parses into OpenAI's deltas: per call `{index, id, type, function: {name,
arguments: ""}}` once the name is known, then `{index, function: {arguments: fragment}}` as the
arguments grow. The concatenated streamed arguments equal the non-streamed ones.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from server.api.tool_parsers.decision import Decision, HeldToolStream
from server.api.tool_parsers.json_scan import object_fields, partial_suffix
from server.api.tool_parsers.strict import ARG_KEYS, Call


@dataclass
class ParsedCall:
    name: str | None = None  # set once the name is complete
    arguments: str = ""  # JSON text so far (a prefix of the final text)
    complete: bool = False  # the arguments' JSON value is complete


@dataclass
class Parsed:
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser:
    """Base class: subclasses set `name` and `marker` and implement `read_calls`."""

    name = ""
    marker = ""  # the text that opens the section of tool calls
    # the model's tool-call markers are special tokens: the text needs them (skip_special_tokens off)
    needs_special_tokens = False

    def for_tools(self, tools: list[dict[str, Any]] | None) -> ToolParser:
        """The parser for one request's tools: formats that write arguments as text read them
        by the tools' parameter types (xml_args.py); the others need nothing."""
        return self

    def section_start(self, text: str) -> int | None:
        """Where the section of calls starts (the first marker), None when there is none."""
        i = text.find(self.marker)
        return i if i >= 0 else None

    def undecided_tail(self, text: str) -> int:
        """How many characters at the end of `text` (which has no section yet) may still turn
        into the start of one: held back while streaming."""
        return partial_suffix(text, self.marker)

    def read_calls(self, text: str, start: int) -> list[Call]:  # pragma: no cover - abstract
        """The calls of the section at `start`, which must run to the end of `text` and hold
        nothing but well-formed calls (raises ValueError otherwise)."""
        raise NotImplementedError

    # -- the decision -------------------------------------------------------------------------
    def decide(self, text: str) -> Decision:
        """The one decision for a finished output: (content before the section, its calls), or
        all content when there is no section or it is not exactly well-formed calls."""
        start = self.section_start(text)
        if start is None:
            return Decision(text)
        try:
            calls = tuple(self.read_calls(text, start))
        except (ValueError, RecursionError):
            return Decision(text)
        return Decision(text[:start], calls) if calls else Decision(text)

    def content_end(self, text: str) -> int:
        """How much of an unfinished output is content whatever comes next (streamed at once)."""
        start = self.section_start(text)
        return start if start is not None else len(text) - self.undecided_tail(text)

    def stream(self) -> HeldToolStream:
        return HeldToolStream(self)

    @staticmethod
    def new_call_id() -> str:
        return "call_" + secrets.token_hex(12)

    def extract(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content or None, OpenAI tool_calls) of a finished output."""
        decision = self.decide(text)
        calls = [tool_call_json(c.id or self.new_call_id(), c.name, c.arguments) for c in decision.calls]
        return decision.content or None, calls


def tool_call_json(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


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
