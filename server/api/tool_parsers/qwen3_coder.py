"""`qwen3_coder`: Qwen3-Coder tool calls (XML, the format its chat template renders).

    some text
    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Content is the text before the first `<tool_call>`. The section is one or more calls, each a
`<function=NAME>` holding `<parameter=KEY>` blocks whose value sits between the newline after
the opening tag and the one before `</parameter>` (a string argument as its text, others as
JSON: xml_args.py); only whitespace between calls; the last `</tool_call>` may be missing where
the output stops.
"""

from __future__ import annotations


from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name
from server.api.tool_parsers.xml_args import Arguments, TypedArgumentsParser, expect, until

START, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"


def _value(raw: str) -> str:
    """The template writes a newline after `<parameter=KEY>` and before `</parameter>`."""
    return raw.removeprefix("\n").removesuffix("\n")


class Qwen3CoderToolParser(TypedArgumentsParser):
    name = "qwen3_coder"
    marker = START

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls, pos = [], start
        while pos < len(text):
            pos = expect(text, skip_ws(text, expect(text, pos, START)), FUNCTION)
            name, pos = until(text, pos, ">")
            name = check_name(name)
            args = Arguments(name, self.types)
            pos = skip_ws(text, pos)
            while text.startswith(PARAM, pos):
                key, pos = until(text, pos + len(PARAM), ">")
                value, pos = until(text, pos, PARAM_END)
                args.add(key, _value(value))
                pos = skip_ws(text, pos)
            pos = skip_ws(text, expect(text, pos, FUNCTION_END))
            if text.startswith(END, pos):
                pos = skip_ws(text, pos + len(END))
            elif pos < len(text):
                raise ValueError("expected </tool_call>")
            calls.append(Call(name, args.json()))
        return calls
