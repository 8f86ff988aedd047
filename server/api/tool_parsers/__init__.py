"""Tool-call parsers for `tool_choice: "auto"`, chosen with `--tool-call-parser` (vLLM's names).

| parser        | model families                                   |
| ------------- | ------------------------------------------------ |
| `hermes`      | Qwen2.5, Qwen3 (incl. Qwen3-MoE), QwQ, Hermes 2/3 |
| `mistral`     | Mistral, Mixtral (v3 and v11+ tokenizers)         |
| `llama3_json` | Llama 3.1 / 3.2 / 3.3 (JSON tool calls)           |
| `deepseek_v3` | DeepSeek-V3, DeepSeek-R1                          |
| `openai`      | gpt-oss (harmony format: commentary-channel calls) |
| `glm45`       | GLM-4.5, GLM-4.6                                  |
| `kimi_k2`     | Kimi K2                                           |
| `qwen3_coder` | Qwen3-Coder (XML)                                 |
| `minimax_m2`  | MiniMax-M2                                        |
| `llama4_pythonic` | Llama 4 (pythonic calls)                      |
"""

from __future__ import annotations

from server.api.tool_parsers.base import ToolCallStream, ToolParser
from server.api.tool_parsers.decision import Decision, HeldToolStream
from server.api.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from server.api.tool_parsers.glm45 import Glm45ToolParser
from server.api.tool_parsers.hermes import HermesToolParser
from server.api.tool_parsers.kimi_k2 import KimiK2ToolParser
from server.api.tool_parsers.llama3_json import Llama3JsonToolParser
from server.api.tool_parsers.llama4_pythonic import Llama4PythonicToolParser
from server.api.tool_parsers.minimax_m2 import MiniMaxM2ToolParser
from server.api.tool_parsers.mistral import MistralToolParser
from server.api.tool_parsers.openai import OpenAIToolParser
from server.api.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, MistralToolParser, Llama3JsonToolParser, DeepSeekV3ToolParser,
                        OpenAIToolParser, Glm45ToolParser, KimiK2ToolParser, Qwen3CoderToolParser, MiniMaxM2ToolParser,
                        Llama4PythonicToolParser)
}

__all__ = ["TOOL_PARSERS", "Decision", "HeldToolStream", "ToolCallStream", "ToolParser"]
