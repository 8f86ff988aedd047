"""What a model family module provides (`models/<family>.py`, listed once in `models/registry.py`).

A family maps its Hugging Face checkpoints onto the one decoder stack of `models/model.py`:
its options become `MoEModelConfig` fields and its tensor names our parameters. Everything
else that knows about families is generated from the registry: the parity tests (each family's
`TINY` configs), the engine tests, and the README's table of supported models (`PUBLISHED`,
printed by scripts/model_families.py). Adding a family is one module and one registry entry;
docs/models.md walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from models.weight_map import WeightMap

# how the engine tests (tests/engine/test_families.py) run a tiny config: in the default suite,
# only with `-m slow`, or not at all (the parity tests run every tiny config)
EngineTests = Literal["default", "slow", "none"]


@dataclass(frozen=True)
class TinyConfig:
    """A tiny random-weight config of one architecture, made with transformers for the tests: the
    family's variants switched on (the shared tiny sizes, `tests/models/conftest.py` TINY, first;
    `fields` override them)."""

    name: str  # test id, e.g. "mixtral-sliding"
    architecture: str
    fields: dict[str, Any] = field(default_factory=dict)
    engine: EngineTests = "none"


@dataclass(frozen=True)
class PublishedConfig:
    """One real checkpoint's config (the fields that matter; transformers' defaults fill the rest)
    for the README's table of supported models."""

    family: str  # the table's first column, e.g. "Qwen3-MoE"
    checkpoint: str  # e.g. "Qwen3-30B-A3B"
    architecture: str
    fields: dict[str, Any]
    quantized: str | None = None  # how its releases ship quantized, e.g. "FP8 block releases"


class Family(Protocol):
    """The module interface (each `models/<family>.py` is one)."""

    ARCHITECTURES: tuple[str, ...]  # HF `architectures` names served
    PUBLISHED: tuple[PublishedConfig, ...]
    TINY: tuple[TinyConfig, ...]

    def hf_config_class(self, arch: str) -> type: ...

    def config_fields(self, hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
        """The family's options as `MoEModelConfig` fields (raises UnsupportedModelError naming
        an option it does not implement)."""

    def weight_map(self, cfg: Any) -> WeightMap: ...
