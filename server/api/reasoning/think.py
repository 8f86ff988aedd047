"""Reasoning parsers for models that think inside `<think>...</think>`.

`split(text, final)` divides the whole output so far into (reasoning, content): the reasoning
is the text up to `</think>` (a leading `<think>` dropped), the content what follows. While
the end tag may still be arriving, a possible partial tag is held back. Successive splits of a
growing text only extend both parts, so streaming sends their differences and ends with
exactly what the non-streamed answer holds.

- `deepseek_r1`: the model starts inside its reasoning (DeepSeek-R1's template opens `<think>`
  in the prompt): without `</think>`, everything is reasoning.
- `qwen3`: the same, unless thinking is off (`chat_template_kwargs: {"enable_thinking": false}`),
  where the whole output is content.

A prompt that already closes the reasoning (it ends with `</think>`) starts in content.
"""

from __future__ import annotations

from typing import Any

from server.api.tool_parsers.json_scan import partial_suffix


class ThinkReasoningParser:
    name = ""
    start_tag = "<think>"
    end_tag = "</think>"

    def __init__(self, in_reasoning: bool = True):
        self.in_reasoning = in_reasoning

    @classmethod
    def starts_in_reasoning(cls, prompt_text: str, template_kwargs: dict[str, Any] | None) -> bool:
        return not prompt_text.rstrip().endswith(cls.end_tag)

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", text
        body = 0
        lead = text.lstrip()
        if lead.startswith(self.start_tag):
            body = len(text) - len(lead) + len(self.start_tag)
        elif not final and self.start_tag.startswith(lead):
            return "", ""  # maybe `<think>` is arriving
        end = text.find(self.end_tag, body)
        if end < 0:
            keep = len(text) if final else len(text) - partial_suffix(text[body:], self.end_tag)
            return text[body:keep], ""
        return text[body:end], text[end + len(self.end_tag):]


class DeepSeekR1ReasoningParser(ThinkReasoningParser):
    name = "deepseek_r1"


class Qwen3ReasoningParser(ThinkReasoningParser):
    name = "qwen3"

    @classmethod
    def starts_in_reasoning(cls, prompt_text: str, template_kwargs: dict[str, Any] | None) -> bool:
        if (template_kwargs or {}).get("enable_thinking") is False:
            return False
        return super().starts_in_reasoning(prompt_text, template_kwargs)
