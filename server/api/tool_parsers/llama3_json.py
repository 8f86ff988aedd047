"""`llama3_json`: Llama 3.1 / 3.2 / 3.3 JSON tool calls.

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ..., "parameters": ...}

optionally after `<|python_tag|>`. An output that starts (after whitespace) with `{` or the tag
is a section of calls (JSON objects separated by `;` or whitespace); anything else is content.
A section that is not exactly such calls is content after all.
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.json_scan import partial_suffix, skip_ws
from server.api.tool_parsers.strict import Call, read_call_object

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    marker = PYTHON_TAG

    def section_start(self, text: str) -> int | None:
        i = skip_ws(text, 0)
        return 0 if text.startswith("{", i) or text.startswith(PYTHON_TAG, i) else None

    def undecided_tail(self, text: str) -> int:
        """Whitespace, or whitespace and the start of the tag: it may still open the section."""
        i = skip_ws(text, 0)
        return len(text) if i == len(text) or partial_suffix(text, PYTHON_TAG) == len(text) - i else 0

    def read_calls(self, text: str, start: int) -> list[Call]:
        pos = skip_ws(text, start)
        if text.startswith(PYTHON_TAG, pos):
            pos = skip_ws(text, pos + len(PYTHON_TAG))
        calls = []
        while True:
            call, end = read_call_object(text, pos)
            calls.append(call)
            pos = skip_ws(text, end)
            if text.startswith(";", pos):
                pos = skip_ws(text, pos + 1)
            if pos >= len(text):
                return calls
