"""`mistral`: Mistral / Mixtral tool calls, both formats:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]   (v3 tokenizers)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]other[ARGS]{...}     (v11+)
    [TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{...}                           (some v11+)

`[TOOL_CALLS]` is a special token: with this parser the server keeps special tokens in the text
(`skip_special_tokens` false unless the request sets it). Call ids are Mistral's 9 characters.
"""

from __future__ import annotations

from server.api.tool_parsers.base import (
    Parsed,
    ParsedCall,
    ToolParser,
    call_from_object,
    collect_calls,
    content_before,
    mistral_call_id,
    read_arguments,
)
from server.api.tool_parsers.json_scan import array_items, skip_ws

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    @staticmethod
    def new_call_id() -> str:
        return mistral_call_id()

    def parse(self, text: str, final: bool) -> Parsed:
        out, first = content_before(text, TOOL_CALLS, final)
        if first < 0:
            return out
        body = skip_ws(text, first + len(TOOL_CALLS))
        if body >= len(text):
            return out
        if text[body] == "[" and not text.startswith(CALL_ID, body) and not text.startswith(ARGS, body):
            items, _ = array_items(text, body)
            for start, _end in items:
                if text[start] != "{":
                    raise ValueError("a tool call must be a JSON object")
                out.calls.append(call_from_object(text, start)[0])
            return out
        return collect_calls(out, text, TOOL_CALLS, first, self._named_call)

    @staticmethod
    def _named_call(text: str, start: int) -> tuple[ParsedCall, int | None]:
        args_at = text.find(ARGS, start)
        if args_at < 0:
            return ParsedCall(), None
        name = text[start:args_at]
        if CALL_ID in name:
            name = name[: name.index(CALL_ID)]
        return read_arguments(ParsedCall(name=name.strip()), text, args_at + len(ARGS))
