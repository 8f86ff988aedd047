"""The model families, in one list: HF `architectures` name -> family module.

Each family module (`models/<family>.py`) satisfies `models.family.Family`: the architectures
it serves, its options as `MoEModelConfig` fields, its checkpoint names (a weight map), its
published configs (the README table) and tiny test configs (the parity and engine tests). The
compute is shared (`models/model.py`). docs/models.md says how to add one.
"""

from __future__ import annotations

from models import (deepseek, deepseek_v32, dots1, ernie, glm4_moe, gpt_oss, granite, hunyuan, kimi_linear, llama4,
                    longcat, minimax, mixtral, qwen3_next, qwen_moe)
from models.config import UnsupportedModelError
from models.family import Family, TinyConfig

FAMILIES: tuple[Family, ...] = (mixtral, qwen_moe, deepseek, glm4_moe, gpt_oss, llama4, granite, ernie, minimax,
                                hunyuan, dots1, longcat, qwen3_next, deepseek_v32, kimi_linear)
BY_ARCHITECTURE: dict[str, Family] = {arch: fam for fam in FAMILIES for arch in fam.ARCHITECTURES}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(BY_ARCHITECTURE)
TINY_CONFIGS: dict[str, TinyConfig] = {t.name: t for fam in FAMILIES for t in fam.TINY}


def family_for(arch: str) -> Family:
    if arch not in BY_ARCHITECTURE:
        raise UnsupportedModelError(f"no model family registered for {arch}")
    return BY_ARCHITECTURE[arch]
