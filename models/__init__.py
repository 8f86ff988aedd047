"""Native PyTorch implementations of Mixture-of-Experts language models."""

from typing import Any

from models.config import MoEModelConfig, UnsupportedModelError

__all__ = ["MoEModelConfig", "UnsupportedModelError", "load_model"]


def __getattr__(name: str) -> Any:
    # `load_model` needs torch: imported on first use, so that torch-free modules of this
    # package (models.config, models.dtypes, models.kernels.flags) import without it
    if name == "load_model":
        from models.build import load_model

        return load_model
    raise AttributeError(f"module 'models' has no attribute {name!r}")
