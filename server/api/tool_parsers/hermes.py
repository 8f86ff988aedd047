"""`hermes`: Hermes 2 Pro, Qwen2.5 / Qwen3 (and QwQ) tool calls.

    some text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call><tool_call>
    {...}
    </tool_call>

Content is the text before the first `<tool_call>`; a possible partial tag at the end of the
text is held back until it is decided.
"""

from __future__ import annotations

from server.api.tool_parsers.base import Parsed, ToolParser, call_from_object
from server.api.tool_parsers.json_scan import partial_suffix, skip_ws

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(START)
        if first < 0:
            keep = len(text) if final else len(text) - partial_suffix(text, START)
            return Parsed(content=text[:keep])
        out = Parsed(content=text[:first])
        pos = first
        while pos >= 0:
            body = skip_ws(text, pos + len(START))
            if body >= len(text):
                break
            if text[body] != "{":
                raise ValueError("a tool call must be a JSON object")
            call, end = call_from_object(text, body)
            out.calls.append(call)
            if end is None:
                break
            pos = text.find(START, end)
        return out
