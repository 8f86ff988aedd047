"""`deepseek_v3`: DeepSeek-V3 / R1 tool calls.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Content is the text before `<｜tool▁calls▁begin｜>`. A call's name is complete at the newline
after it; its arguments are the JSON value after the ```json fence.
"""

from __future__ import annotations

from server.api.tool_parsers.base import Parsed, ParsedCall, ToolParser
from server.api.tool_parsers.json_scan import partial_suffix, skip_ws, value_end

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
SEP = "<｜tool▁sep｜>"
FENCE = "```json"


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(CALLS_BEGIN)
        if first < 0:
            keep = len(text) if final else len(text) - partial_suffix(text, CALLS_BEGIN)
            return Parsed(content=text[:keep])
        out = Parsed(content=text[:first])
        pos = text.find(CALL_BEGIN, first)
        while pos >= 0:
            call, end = self._call(text, pos + len(CALL_BEGIN))
            if call is None:
                break
            out.calls.append(call)
            if end is None:
                break
            pos = text.find(CALL_BEGIN, end)
        return out

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
        j = skip_ws(text, fence + len(FENCE))
        if j >= len(text):
            return call, None
        end = value_end(text, j)
        call.arguments = text[j:end] if end is not None else text[j:]
        call.complete = end is not None
        return call, end
