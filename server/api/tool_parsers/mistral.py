"""`mistral`: Mistral / Mixtral tool calls, both formats:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]   (v3 tokenizers)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]other[ARGS]{...}     (v11+)
    [TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{...}                           (some v11+)

Content is the text before the first `[TOOL_CALLS]`; the section is one array of call objects,
or one or more name / arguments pairs, with nothing but whitespace after. `[TOOL_CALLS]` is a
special token: with this parser the server keeps special tokens in the text
(`skip_special_tokens` false unless the request sets it). Call ids are Mistral's 9 characters.
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolParser, mistral_call_id
from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name, read_arguments, read_call_object

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


class MistralToolParser(ToolParser):
    name = "mistral"
    marker = TOOL_CALLS
    needs_special_tokens = True

    @staticmethod
    def new_call_id() -> str:
        return mistral_call_id()

    def read_calls(self, text: str, start: int) -> list[Call]:
        body = skip_ws(text, start + len(TOOL_CALLS))
        if text.startswith("[", body) and not text.startswith(CALL_ID, body) and not text.startswith(ARGS, body):
            return self._array(text, body)
        calls, pos = [], start
        while pos < len(text):
            if not text.startswith(TOOL_CALLS, pos):
                raise ValueError("text after the tool calls")
            pos += len(TOOL_CALLS)
            args_at = text.find(ARGS, pos)
            if args_at < 0:
                raise ValueError("a call without [ARGS]")
            name = text[pos:args_at]
            if CALL_ID in name:
                name = name[: name.index(CALL_ID)]
            arguments, end = read_arguments(text, args_at + len(ARGS))
            calls.append(Call(check_name(name.strip()), arguments))
            pos = skip_ws(text, end)
        return calls

    @staticmethod
    def _array(text: str, start: int) -> list[Call]:
        """`[call, call, ...]` at `start`, then only whitespace."""
        calls, pos = [], skip_ws(text, start + 1)
        while True:
            call, end = read_call_object(text, pos)
            calls.append(call)
            pos = skip_ws(text, end)
            if text.startswith(",", pos):
                pos = skip_ws(text, pos + 1)
                continue
            if not text.startswith("]", pos) or skip_ws(text, pos + 1) < len(text):
                raise ValueError("expected the end of the tool-call array")
            return calls
