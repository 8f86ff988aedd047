"""Native PyTorch implementations of Mixture-of-Experts language models."""

from models.config import MoEModelConfig, UnsupportedModelError
from models.registry import load_model

__all__ = ["MoEModelConfig", "UnsupportedModelError", "load_model"]
