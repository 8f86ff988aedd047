"""`kimi_k2`: Kimi K2 tool calls (the format its chat template renders).

    some text<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

Content is the text before `<|tool_calls_section_begin|>`. The section is one or more calls,
each an id `functions.NAME:INDEX` (the name is what lies between `functions.` and the last
`:`) and a JSON object of arguments; the closing markers may be missing only where the output
stops; only whitespace around them. The call's id is the model's own (`functions.NAME:INDEX`),
as vLLM returns it: Kimi's template writes the history's call ids back into the prompt.
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name, read_arguments
from server.api.tool_parsers.xml_args import expect, until

SECTION, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL, ARGS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call_name(call_id: str) -> str:
    head, sep, index = call_id.strip().rpartition(":")
    if not sep or not index.isdigit():
        raise ValueError("a Kimi call id is functions.NAME:INDEX")
    return check_name(head.removeprefix("functions."))


class KimiK2ToolParser(ToolParser):
    name = "kimi_k2"
    marker = SECTION
    needs_special_tokens = True  # the section and call markers are special tokens

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls, pos = [], skip_ws(text, start + len(SECTION))
        while True:
            call_id, pos = until(text, expect(text, pos, CALL), ARGS)
            arguments, end = read_arguments(text, pos)
            calls.append(Call(call_name(call_id), arguments, call_id.strip()))  # its id, as vLLM returns it
            pos = skip_ws(text, end)
            if pos >= len(text):
                return calls
            pos = skip_ws(text, expect(text, pos, CALL_END))
            if pos >= len(text):
                return calls
            if text.startswith(SECTION_END, pos):
                if skip_ws(text, pos + len(SECTION_END)) < len(text):
                    raise ValueError("text after the tool calls")
                return calls
