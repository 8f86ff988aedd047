"""`mistral`: Mistral / Mixtral tool calls, both formats:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]   (v3 tokenizers)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]other[ARGS]{...}     (v11+)
    [TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{...}                           (some v11+)

`[TOOL_CALLS]` is a special token: with this parser the server keeps special tokens in the text
(`skip_special_tokens` false unless the request sets it). Call ids are Mistral's 9 characters.
"""

from __future__ import annotations

from server.api.tool_parsers.base import Parsed, ParsedCall, ToolParser, call_from_object, mistral_call_id
from server.api.tool_parsers.json_scan import array_items, partial_suffix, skip_ws, value_end

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    @staticmethod
    def new_call_id() -> str:
        return mistral_call_id()

    def parse(self, text: str, final: bool) -> Parsed:
        first = text.find(TOOL_CALLS)
        if first < 0:
            keep = len(text) if final else len(text) - partial_suffix(text, TOOL_CALLS)
            return Parsed(content=text[:keep])
        out = Parsed(content=text[:first])
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
        pos = first
        while pos >= 0:
            call, end = self._named_call(text, pos + len(TOOL_CALLS), final)
            out.calls.append(call)
            if end is None:
                break
            pos = text.find(TOOL_CALLS, end)
        return out

    @staticmethod
    def _named_call(text: str, start: int, final: bool) -> tuple[ParsedCall, int | None]:
        args_at = text.find(ARGS, start)
        if args_at < 0:
            return ParsedCall(), None
        name = text[start:args_at]
        if CALL_ID in name:
            name = name[: name.index(CALL_ID)]
        call = ParsedCall(name=name.strip())
        j = skip_ws(text, args_at + len(ARGS))
        if j >= len(text):
            return call, None
        end = value_end(text, j)
        call.arguments = text[j:end] if end is not None else text[j:]
        call.complete = end is not None
        return call, end
