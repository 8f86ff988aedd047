"""gpt-oss's harmony format, on the text of an output whose special tokens were kept.

After the prompt's `<|start|>assistant` the model writes messages: a header (an optional
` to=RECIPIENT`, `<|channel|>CHANNEL`, an optional content type such as ` json` or
`<|constrain|>json`), `<|message|>`, the body, and an end token: `<|end|>` between messages,
`<|return|>` after the final answer, `<|call|>` after a tool call; each later message opens
with `<|start|>assistant`. Channels: `analysis` (the reasoning), `commentary` (tool calls, which
name their recipient, e.g. `to=functions.get_weather`, and preambles), `final` (the answer).

`split_harmony` reads that text as the `openai_gptoss` reasoning parser does (text level, so
it streams). The `openai` tool parser (tool_parsers/openai.py) reads the calls strictly with
the `openai-harmony` package, whose tokenizer (o200k_base) is read from
`TIKTOKEN_ENCODINGS_BASE` (scripts/install_agents.sh writes it to .tools/tiktoken).
"""

from __future__ import annotations

import functools
from typing import Any

from server.api.tool_parsers.json_scan import partial_suffix

START = "<|start|>assistant"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")


def _header(text: str, pos: int) -> tuple[str | None, str | None, int] | None:
    """(channel, recipient, body start) of the message header at `pos`; None while it is
    incomplete (no `<|message|>` yet); raises ValueError when `pos` holds no header."""
    if text.startswith(START, pos):
        pos += len(START)
    end = text.find(MESSAGE, pos)
    head = text[pos:end if end >= 0 else len(text)]
    if CHANNEL not in head and not head.lstrip().startswith("to=") and not CHANNEL.startswith(head.lstrip()[:11]):
        raise ValueError("not a harmony message header")
    if any(t in head for t in ("<|start|>", *ENDS)):
        raise ValueError("not a harmony message header")
    if end < 0:
        return None
    channel = head.split(CHANNEL, 1)[1].split()[0] if CHANNEL in head and head.split(CHANNEL, 1)[1].split() else None
    recipient = next((w[3:] for w in head.replace(CHANNEL, " ").split() if w.startswith("to=")), None)
    return channel, recipient, end + len(MESSAGE)


def split_harmony(text: str, final: bool) -> tuple[str, str]:
    """(reasoning, content) of an output so far: the analysis messages' bodies are the
    reasoning; final and preamble bodies are content; from the first message with a recipient
    (a tool call) on, the raw text is content, for the `openai` tool parser. Text that is not
    harmony is content as it is. Successive splits of a growing text only extend both parts."""
    reasoning, content, pos = "", "", 0
    while pos < len(text):
        try:
            head = _header(text, pos)
        except ValueError:
            return reasoning, content + text[pos:]
        if head is None:  # a header still arriving: held back
            return reasoning, content + (text[pos:] if final else "")
        channel, recipient, body = head
        if recipient is not None:
            return reasoning, content + text[pos:]
        ends = [(i, t) for t in ENDS if (i := text.find(t, body)) >= 0]
        if not ends:
            keep = len(text) if final else len(text) - max(partial_suffix(text[body:], t) for t in ENDS)
            piece = text[body:keep]
            return (reasoning + piece, content) if channel == "analysis" else (reasoning, content + piece)
        end, token = min(ends)
        if channel == "analysis":
            reasoning += text[body:end]
        else:
            content += text[body:end]
        pos = end + len(token)
    return reasoning, content


@functools.lru_cache(maxsize=1)
def encoding() -> Any:
    """openai-harmony's gpt-oss encoding (o200k_base from TIKTOKEN_ENCODINGS_BASE)."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def parse_messages(text: str) -> list[Any]:
    """The harmony messages of an assistant output's text (raises ValueError if it is not)."""
    from openai_harmony import HarmonyError, Role

    enc = encoding()
    text = text.removeprefix(START)
    try:
        return list(enc.parse_messages_from_completion_tokens(enc.encode(text, allowed_special="all"), Role.ASSISTANT))
    except HarmonyError as e:
        raise ValueError(f"not harmony messages: {e}") from None
