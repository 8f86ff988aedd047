"""`openai`: gpt-oss tool calls (harmony format, read with the `openai-harmony` package).

    <|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>

(or `<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>...`). Use it
with `--reasoning-parser openai_gptoss`, which takes the analysis channel as the reasoning and
the final channel as the content, and hands the text from the first call on to this parser
(server/api/harmony.py). The section is one or more messages addressed to `functions.NAME`
whose bodies are JSON objects; anything else in it makes the whole output content.
"""

from __future__ import annotations

import re

from server.api import harmony
from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.json_scan import skip_ws
from server.api.tool_parsers.strict import Call, check_name, read_arguments

SECTION = re.compile(r"(?:<\|start\|>assistant)?(?:<\|channel\|>\w+)? ?to=functions\.")


class OpenAIToolParser(ToolParser):
    name = "openai"
    marker = " to=functions."
    needs_special_tokens = True  # the harmony framing is special tokens

    def __init__(self) -> None:
        try:
            harmony.encoding()
        except Exception as e:  # noqa: BLE001 - a missing vocabulary: say where it is read from, at startup
            raise RuntimeError(f"--tool-call-parser openai needs openai-harmony's o200k_base vocabulary "
                               f"(TIKTOKEN_ENCODINGS_BASE, e.g. .tools/tiktoken from scripts/install_agents.sh): {e}"
                               ) from None

    def section_start(self, text: str) -> int | None:
        m = SECTION.search(text)
        return m.start() if m else None

    def undecided_tail(self, text: str) -> int:
        return max(super().undecided_tail(text), *(
            n for n in range(1, min(len(text), 40) + 1) if "<|start|>assistant to=functions.".startswith(text[-n:])
            or "<|channel|>commentary to=functions.".startswith(text[-n:])), 0)

    def read_calls(self, text: str, start: int) -> list[Call]:
        calls = []
        for m in harmony.parse_messages(text[start:]):
            recipient = m.recipient or ""
            if not recipient.startswith("functions.") or len(m.content) != 1:
                raise ValueError("a harmony message that is not a function call")
            body = m.content[0].text
            arguments, end = read_arguments(body, 0)
            if skip_ws(body, end) < len(body):
                raise ValueError("text after the arguments")
            calls.append(Call(check_name(recipient[len("functions."):]), arguments))
        if not calls:
            raise ValueError("no call")
        return calls
