"""Reasoning parsers (`--reasoning-parser`, vLLM's names): split a reasoning model's output into
`reasoning_content` and `content`. Structured output applies after the reasoning part (the
engine's grammar starts at the end tag's tokens).

| parser        | model families                                   |
| ------------- | ------------------------------------------------ |
| `deepseek_r1` | DeepSeek-R1 and its distills                     |
| `qwen3`       | Qwen3 thinking models (incl. Qwen3-MoE), QwQ     |
| `openai_gptoss` | gpt-oss (harmony: the analysis channel)        |
"""

from __future__ import annotations

from typing import Any

from server.api.reasoning.harmony import HarmonyReasoningParser
from server.api.reasoning.think import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ThinkReasoningParser,
)

REASONING_PARSERS: dict[str, type[Any]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser, HarmonyReasoningParser)
}

__all__ = ["REASONING_PARSERS", "ThinkReasoningParser"]
