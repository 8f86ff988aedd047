"""`glm45`: GLM-4.5 / GLM-4.6 tool calls (the format their chat template renders).

    some text
    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

Content is the text before the first `<tool_call>`. The section is one or more calls, each a
name and `<arg_key>` / `<arg_value>` pairs (a string argument as its text, others as JSON:
xml_args.py), with only whitespace between them; the last `</tool_call>` may be missing where
the output stops. `<|observation|>` (the token GLM ends a tool-calling turn with) may close it.
"""

from __future__ import annotations


from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name
from server.api.tool_parsers.xml_args import Arguments, TypedArgumentsParser, expect, until

START, END = "<tool_call>", "</tool_call>"
KEY, KEY_END, VALUE, VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
TRAILERS = ("<|observation|>",)


class Glm45ToolParser(TypedArgumentsParser):
    name = "glm45"
    marker = START
    needs_special_tokens = True  # <tool_call>, <arg_key>, ... are special tokens of GLM's tokenizer

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls, pos = [], start
        while pos < len(text):
            if text.startswith(TRAILERS, pos) and skip_ws(text, pos + len(TRAILERS[0])) >= len(text):
                break
            pos = expect(text, pos, START)
            ends = [i for i in (text.find("\n", pos), text.find(KEY, pos), text.find(END, pos)) if i >= 0]
            stop = min(ends) if ends else len(text)
            name = check_name(text[pos:stop].strip())
            args = Arguments(name, self.types)
            pos = skip_ws(text, stop)
            while text.startswith(KEY, pos):
                key, pos = until(text, pos + len(KEY), KEY_END)
                pos = expect(text, skip_ws(text, pos), VALUE)
                value, pos = until(text, pos, VALUE_END)
                args.add(key.strip(), value)
                pos = skip_ws(text, pos)
            if text.startswith(END, pos):
                pos = skip_ws(text, pos + len(END))
            elif pos < len(text) and not text.startswith(TRAILERS, pos):
                raise ValueError("expected </tool_call>")
            calls.append(Call(name, args.json()))
        return calls
