"""The vLLM backend (`--engine vllm`): `VLLMEngine` (engine.py) with its argument mapping
(args.py), request/output mapping (sampling.py) and stats bridge (stats.py). Nothing here
imports vLLM at module level."""

from server.engine.vllm.engine import VLLMEngine

__all__ = ["VLLMEngine"]
