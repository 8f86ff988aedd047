"""One chat choice's output -> `reasoning_content`, `content` and `tool_calls`, streamed or whole.

The reasoning parser (if any) splits the text first; the content part then goes to the tool
handling of the request: the `--tool-call-parser` for `auto`, the grammar-shaped parse for
`required` and named choices, nothing for `none`. Streaming feeds each delta and sends what
the parses of the growing text added; the last feed (`final=True`) releases any held-back
tail. Both paths make the same decision, so a streamed answer adds up to the non-streamed one:
for `auto`, the parser's one decision per output (server/api/tool_parsers/decision.py: tool
calls are held back until the output is complete); for `required` and named choices, the
incremental parse of their grammar-shaped output.
"""

from __future__ import annotations

from typing import Any

from server.api.tool_parsers import HeldToolStream, ToolCallStream, ToolParser
from server.api.tool_parsers.base import tool_call_json
from server.api.tools import ToolPlan, parse_named, parse_required


class ChoiceOutput:
    def __init__(self, plan: ToolPlan, tool_parser: ToolParser | None, reasoning: Any | None):
        self.plan = plan
        self.reasoning = reasoning  # a ThinkReasoningParser or None
        self.text = ""
        self._reasoning_sent = 0
        self._content_sent = 0
        self._parse = None
        # its decide() answers both paths; bound to the request's tools (their parameter types)
        self._auto = (tool_parser.for_tools(plan.tools)
                      if plan.mode == "auto" and tool_parser is not None else None)
        self._stream: ToolCallStream | HeldToolStream | None = None
        if self._auto is not None:
            self._stream = self._auto.stream()
        elif plan.mode in ("named", "required"):
            self._parse = parse_named(plan.named or "") if plan.mode == "named" else parse_required
            self._stream = ToolCallStream(self._parse, ToolParser.new_call_id)

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        if self.reasoning is None:
            return None, text
        return self.reasoning.split(text, final)

    # -- streaming ------------------------------------------------------------------------------
    def feed(self, delta: str, final: bool = False) -> dict[str, Any]:
        """The delta message fields this text adds (empty dict: nothing to send yet)."""
        self.text += delta
        reasoning, content = self._split(self.text, final)
        out: dict[str, Any] = {}
        if reasoning is not None and len(reasoning) > self._reasoning_sent:
            out["reasoning_content"] = reasoning[self._reasoning_sent:]
            self._reasoning_sent = len(reasoning)
        if self._stream is not None:
            if reasoning is not None and not content and not final:
                return out  # tool handling starts with the content
            text, calls = self._stream.update(content, final)
            if text:
                out["content"] = text
            if calls:
                out["tool_calls"] = calls
        elif len(content) > self._content_sent:
            out["content"] = content[self._content_sent:]
            self._content_sent = len(content)
        return out

    def stream_finish_reason(self, engine_reason: str | None) -> str | None:
        return self._finish_reason(engine_reason, self._stream is not None and self._stream.called)

    # -- whole ------------------------------------------------------------------------------------
    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """(the assistant message, whether it holds tool calls)."""
        reasoning, content = self._split(text, True)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning or None
        calls: list[dict[str, Any]] = []
        if self._auto is not None:
            msg["content"], calls = self._auto.extract(content)
        elif self._parse is not None:  # required / named: the grammar shaped the whole content
            try:
                parsed = self._parse(content, True)
            except ValueError:
                parsed = None
            if parsed is not None:
                calls = [tool_call_json(ToolParser.new_call_id(), c.name, c.arguments) for c in parsed.calls if c.name]
                msg["content"] = None
        if calls:
            msg["tool_calls"] = calls
        return msg, bool(calls)

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        return self._finish_reason(engine_reason, called)

    def _finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """OpenAI: "tool_calls" when the model called tools of its own accord (auto) or had to
        (required); a named choice finishes with "stop"."""
        if engine_reason == "stop" and called and self.plan.mode in ("auto", "required"):
            return "tool_calls"
        return engine_reason
