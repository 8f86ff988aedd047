"""`openai_gptoss` (vLLM's name): gpt-oss's harmony output split into the analysis channel (the
reasoning) and the final channel (the content); tool calls are left, as text, to the `openai`
tool parser (server/api/harmony.py)."""

from __future__ import annotations

from typing import Any

from server.api.harmony import split_harmony


class HarmonyReasoningParser:
    name = "openai_gptoss"
    end_tag = "<|end|>"
    needs_special_tokens = True  # the channels are told apart by special tokens

    def __init__(self, in_reasoning: bool = True):
        self.in_reasoning = in_reasoning

    @classmethod
    def starts_in_reasoning(cls, prompt_text: str, template_kwargs: dict[str, Any] | None) -> bool:
        return False  # the output opens with its own channel header

    def split(self, text: str, final: bool) -> tuple[str, str]:
        return split_harmony(text, final)
