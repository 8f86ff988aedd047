"""`deepseek_v3`: DeepSeek-V3 / R1 tool calls.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Content is the text before `<｜tool▁calls▁begin｜>`. The section is one or more calls, each a
type (`function`), a name ending at the newline, and a JSON object in a ```json fence; closing
fences and markers may be missing only where the output stops; only whitespace around them.
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name, read_arguments

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
SEP = "<｜tool▁sep｜>"
CALL_END = "<｜tool▁call▁end｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
FENCE, FENCE_END = "```json", "```"


def _skip(text: str, pos: int, token: str) -> int:
    """Past `token` at `pos` (then whitespace); at the end of the text a missing token is allowed."""
    if text.startswith(token, pos):
        return skip_ws(text, pos + len(token))
    if pos < len(text):
        raise ValueError(f"expected {token}")
    return pos


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    marker = CALLS_BEGIN

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls, pos = [], skip_ws(text, start + len(CALLS_BEGIN))
        while True:
            if not text.startswith(CALL_BEGIN, pos):
                raise ValueError("expected a tool call")
            pos += len(CALL_BEGIN)
            sep, newline = text.find(SEP, pos), text.find("\n", pos)
            if sep < 0 or newline < sep or text[pos:sep].strip() != "function":
                raise ValueError("expected function<｜tool▁sep｜>name")
            name = check_name(text[sep + len(SEP):newline].strip())
            fence = skip_ws(text, newline)
            if not text.startswith(FENCE, fence):
                raise ValueError("expected ```json")
            arguments, end = read_arguments(text, fence + len(FENCE))
            calls.append(Call(name, arguments))
            pos = _skip(text, _skip(text, skip_ws(text, end), FENCE_END), CALL_END)
            if pos >= len(text):
                return calls
            if text.startswith(CALLS_END, pos):
                if skip_ws(text, pos + len(CALLS_END)) < len(text):
                    raise ValueError("text after the tool calls")
                return calls
