"""`llama3_json`: Llama 3.1 / 3.2 JSON tool calls.

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ..., "parameters": ...}

optionally after `<|python_tag|>`. An output that starts (after whitespace) with `{` is taken
as tool calls; anything else is content. At the end, an output that does not parse as calls is
content after all.
"""

from __future__ import annotations

from server.api.tool_parsers.base import Parsed, ToolParser, call_from_object
from server.api.tool_parsers.json_scan import partial_suffix, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> Parsed:
        start = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, start):
            start = skip_ws(text, start + len(PYTHON_TAG))
        elif not final and partial_suffix(text[start:], PYTHON_TAG) == len(text) - start and start < len(text):
            return Parsed()  # maybe the tag is coming
        if start >= len(text):
            return Parsed(content=text if final else "")
        if text[start] != "{":
            return Parsed(content=text)
        out = Parsed()
        pos = start
        while True:
            call, end = call_from_object(text, pos)
            out.calls.append(call)
            if end is None:
                break
            pos = skip_ws(text, end)
            if pos < len(text) and text[pos] == ";":
                pos = skip_ws(text, pos + 1)
            if pos >= len(text) or text[pos] != "{":
                break
        return out
