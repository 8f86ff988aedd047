"""Weight dtype names: the canonical torch names and vLLM's aliases for them.

Torch-free, so that configuration (server/config.py) and `moe-serve --help` use the same names
as `models.registry.resolve_dtype` without loading torch.
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")  # torch attribute names
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; canonical names and 'auto' unchanged."""
    return DTYPE_ALIASES.get(name, name)
