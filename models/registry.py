"""HF `architectures` name -> (model class, checkpoint mapping table), and `load_model`."""

from __future__ import annotations

import time
from typing import Callable

import torch

from models import mixtral, qwen_moe
from models.config import MoEModelConfig, UnsupportedModelError
from models.loader import WeightMap, load_weights
from models.model import MoEForCausalLM

REGISTRY: dict[str, tuple[type[MoEForCausalLM], Callable[[MoEModelConfig], WeightMap]]] = {
    "MixtralForCausalLM": (MoEForCausalLM, mixtral.weight_map),
    "Qwen2MoeForCausalLM": (MoEForCausalLM, qwen_moe.weight_map),
    "Qwen3MoeForCausalLM": (MoEForCausalLM, qwen_moe.weight_map),
    "OlmoeForCausalLM": (MoEForCausalLM, qwen_moe.weight_map),
}


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype on CUDA (bf16 if the GPU has it); on CPUs without native
    bf16 compute, float32 (bf16 matmuls there are two orders of magnitude slower)."""
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name != "auto":
        return getattr(torch, name)
    ckpt = getattr(torch, aliases.get(checkpoint_dtype, checkpoint_dtype), torch.float32)
    if device.type == "cuda":
        if ckpt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return ckpt if ckpt in (torch.bfloat16, torch.float16) else torch.bfloat16
    if ckpt in (torch.bfloat16, torch.float16) and cpu_has_native_bf16() and ckpt == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(
    path: str, dtype: str = "auto", device: str = "auto", progress: bool = True
) -> MoEForCausalLM:
    cfg = MoEModelConfig.from_hf(path)
    if cfg.architecture not in REGISTRY:
        raise UnsupportedModelError(f"no model class registered for {cfg.architecture}")
    model_cls, mapping = REGISTRY[cfg.architecture]
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, cfg.torch_dtype, dev)
    t0 = time.monotonic()
    with torch.device("meta"):
        model = model_cls(cfg).to(torch_dtype)  # no memory yet
    model = model.to_empty(device=dev)
    model.rotary.reset_parameters()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    load_weights(model, path, mapping(cfg), progress=progress)
    model.eval()
    model.load_seconds = time.monotonic() - t0
    return model
