"""Reasoning parsers (`--reasoning-parser`, vLLM's names): split a reasoning model's output into
`reasoning_content` and `content`. Structured output applies after the reasoning part (the
engine's grammar starts at the end tag's tokens).

| parser        | model families                                   |
| ------------- | ------------------------------------------------ |
| `deepseek_r1` | DeepSeek-R1 and its distills                     |
| `qwen3`       | Qwen3 thinking models (incl. Qwen3-MoE), QwQ     |
"""

from __future__ import annotations

from server.api.reasoning.think import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ThinkReasoningParser

REASONING_PARSERS: dict[str, type[ThinkReasoningParser]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}

__all__ = ["REASONING_PARSERS", "ThinkReasoningParser"]
