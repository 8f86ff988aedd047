"""One decision per output for `tool_choice: "auto"`, made the same way streamed or not.

An output is content, then possibly a *section* of tool calls that opens with the format's
marker (`<tool_call>`, `[TOOL_CALLS]`, ...). `decide` is all-or-nothing: the section must be
exactly a sequence of well-formed calls (strict.py: names, arguments that are JSON objects, no
duplicate keys) with nothing but whitespace and the format's own markers around them; then the
answer is (the content before the section, the calls) and finish_reason "tool_calls".
Otherwise the whole output is content, with the finish_reason the engine gave, as if there
were no parser: nothing the model wrote is lost.

`HeldToolStream` streams that same decision. Content goes out as it comes, up to the section's
marker (an end that may still become the marker is held back). From the marker on nothing is
sent until the output is complete, because any later character can still make the section
invalid (garbage after a call, a second call that does not parse). The last feed decides on
the whole output and sends the calls (per call OpenAI's first delta with id, type and name and
empty arguments, then the arguments in one fragment) or the held text as content. The
streamed answer therefore adds up to the non-streamed one by construction.

Why hold back rather than stream arguments as they are generated: vLLM's parsers stream a
call's name and arguments early; when the call then turns out malformed, the stream has sent
a call (and finish_reason "tool_calls") that its non-streamed parse of the same output would
have returned as content. A stream cannot take back what it sent, so the only rule that keeps
both answers equal is to send a call once it is known valid, and with an all-or-nothing
section that is at the end. What this costs: `auto` calls arrive whole in the last chunks
instead of fragment by fragment. Grammar-enforced choices (`required`, a named function) still
stream their arguments as generated (base.py ToolCallStream): their output cannot turn invalid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.api.tool_parsers.strict import Call


@dataclass(frozen=True)
class Decision:
    content: str  # the whole output when there are no calls
    calls: tuple[Call, ...] = ()


class HeldToolStream:
    """Streams one output's decision (`parser`: a ToolParser) as OpenAI deltas."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self._sent = 0  # characters of content sent
        self._done = False
        self.called = False  # the decision holds calls (finish_reason "tool_calls")

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(content fragment, tool-call deltas) that the output so far adds."""
        if self._done:
            return "", []
        if not final:
            end = self._parser.content_end(text)
            piece = text[self._sent:end] if end > self._sent else ""
            self._sent = max(self._sent, end)
            return piece, []
        self._done = True
        decision = self._parser.decide(text)
        assert decision.content.startswith(text[:self._sent]), "streamed content is not a prefix of the decision"
        deltas: list[dict[str, Any]] = []
        for i, call in enumerate(decision.calls):
            deltas.append({"index": i, "id": call.id or self._parser.new_call_id(), "type": "function",
                           "function": {"name": call.name, "arguments": ""}})
            deltas.append({"index": i, "function": {"arguments": call.arguments}})
        self.called = bool(decision.calls)
        return decision.content[self._sent:], deltas
