"""`deepseek_v3`: DeepSeek-V3 / R1 tool calls.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Content is the text before `<｜tool▁calls▁begin｜>`. A call's name is complete at the newline
after it; its arguments are the JSON value after the ```json fence.
"""

from __future__ import annotations

from server.api.tool_parsers.base import Parsed, ParsedCall, ToolParser, parse_marked, read_arguments

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
SEP = "<｜tool▁sep｜>"
FENCE = "```json"


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"

    def parse(self, text: str, final: bool) -> Parsed:
        return parse_marked(text, final, CALLS_BEGIN, self._call, call_marker=CALL_BEGIN)

    @staticmethod
    def _call(text: str, start: int) -> tuple[ParsedCall | None, int | None]:
        sep = text.find(SEP, start)
        if sep < 0:
            return None, None
        newline = text.find("\n", sep)
        if newline < 0:
            return None, None
        call = ParsedCall(name=text[sep + len(SEP):newline].strip())
        fence = text.find(FENCE, newline)
        if fence < 0:
            return call, None
        return read_arguments(call, text, fence + len(FENCE))
