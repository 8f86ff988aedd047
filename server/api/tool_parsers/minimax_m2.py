"""`minimax_m2`: MiniMax-M2 tool calls (the format its chat template renders).

    some text
    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

Content is the text before the first `<minimax:tool_call>`. The section is one or more such
blocks of one or more `<invoke name="...">` calls, each holding `<parameter name="...">`
values (a string argument as its text, others as JSON: xml_args.py); only whitespace between
them; the last `</minimax:tool_call>` may be missing where the output stops.
"""

from __future__ import annotations


from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name
from server.api.tool_parsers.xml_args import Arguments, TypedArgumentsParser, expect, until

START, END = "<minimax:tool_call>", "</minimax:tool_call>"
INVOKE, INVOKE_END = '<invoke name="', "</invoke>"
PARAM, PARAM_END = '<parameter name="', "</parameter>"


class MiniMaxM2ToolParser(TypedArgumentsParser):
    name = "minimax_m2"
    marker = START
    needs_special_tokens = True  # <minimax:tool_call> is a special token of MiniMax's tokenizer

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls, pos = [], start
        while pos < len(text):
            pos = skip_ws(text, expect(text, pos, START))
            block = 0
            while text.startswith(INVOKE, pos):
                name, pos = until(text, pos + len(INVOKE), '">')
                name = check_name(name)
                args = Arguments(name, self.types)
                pos = skip_ws(text, pos)
                while text.startswith(PARAM, pos):
                    key, pos = until(text, pos + len(PARAM), '">')
                    value, pos = until(text, pos, PARAM_END)
                    args.add(key, value)
                    pos = skip_ws(text, pos)
                pos = skip_ws(text, expect(text, pos, INVOKE_END))
                calls.append(Call(name, args.json()))
                block += 1
            if not block:
                raise ValueError("expected <invoke name=...>")
            if text.startswith(END, pos):
                pos = skip_ws(text, pos + len(END))
            elif pos < len(text):
                raise ValueError("expected </minimax:tool_call>")
        return calls
