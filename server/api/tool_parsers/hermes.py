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

from server.api.tool_parsers.base import Parsed, ParsedCall, ToolParser, call_from_object, parse_marked
from server.api.tool_parsers.json_scan import skip_ws

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> Parsed:
        return parse_marked(text, final, START, self._call)

    @staticmethod
    def _call(text: str, start: int) -> tuple[ParsedCall | None, int | None]:
        body = skip_ws(text, start)
        if body >= len(text):
            return None, None
        if text[body] != "{":
            raise ValueError("a tool call must be a JSON object")
        return call_from_object(text, body)
