"""`hermes`: Hermes 2 Pro, Qwen2.5 / Qwen3 (and QwQ) tool calls.

    some text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call><tool_call>
    {...}
    </tool_call>

Content is the text before the first `<tool_call>`. The section is one or more calls, each a
JSON object between `<tool_call>` and `</tool_call>` (the last `</tool_call>` may be missing
when the output stops right after the object), with only whitespace between and after them.
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, read_call_object

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    marker = START

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls, pos = [], start
        while pos < len(text):
            if not text.startswith(START, pos):
                raise ValueError("text after the tool calls")
            call, end = read_call_object(text, pos + len(START))
            calls.append(call)
            pos = skip_ws(text, end)
            if text.startswith(END, pos):
                pos = skip_ws(text, pos + len(END))
            elif pos < len(text):
                raise ValueError("expected </tool_call>")
        return calls
