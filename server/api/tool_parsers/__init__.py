"""Tool-call parsers for `tool_choice: "auto"`, chosen with `--tool-call-parser` (vLLM's names).

| parser        | model families                                   |
| ------------- | ------------------------------------------------ |
| `hermes`      | Qwen2.5, Qwen3 (incl. Qwen3-MoE), QwQ, Hermes 2/3 |
| `mistral`     | Mistral, Mixtral (v3 and v11+ tokenizers)         |
| `llama3_json` | Llama 3.1 / 3.2 / 3.3 (JSON tool calls)           |
| `deepseek_v3` | DeepSeek-V3, DeepSeek-R1                          |
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolCallStream, ToolParser
from server.api.tool_parsers.decision import Decision, HeldToolStream
from server.api.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from server.api.tool_parsers.hermes import HermesToolParser
from server.api.tool_parsers.llama3_json import Llama3JsonToolParser
from server.api.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, MistralToolParser, Llama3JsonToolParser, DeepSeekV3ToolParser)
}

__all__ = ["TOOL_PARSERS", "Decision", "HeldToolStream", "ToolCallStream", "ToolParser"]
