"""HF `architectures` name -> family module (config mapping + checkpoint mapping table), and `load_model`.

A family module (`models/<family>.py`) provides `config_fields(hf, arch, num_layers)` (its options as
`MoEModelConfig` fields), `weight_map(cfg)` (checkpoint name -> our parameter) and
`hf_config_class(arch)`; the compute is shared (`models/model.py`). docs/models.md says how to
add one.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType

import torch

from models.config import SUPPORTED_ARCHITECTURES, MoEModelConfig, UnsupportedModelError
from models.dtypes import canonical_dtype
from models.loader import load_weights
from models.model import MoEForCausalLM

log = logging.getLogger(__name__)

FAMILIES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen_moe",
    "Qwen3MoeForCausalLM": "qwen_moe",
    "OlmoeForCausalLM": "qwen_moe",
    "DeepseekV2ForCausalLM": "deepseek",
    "DeepseekV3ForCausalLM": "deepseek",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
    "Llama4ForCausalLM": "llama4",
    "GraniteMoeForCausalLM": "granite",
    "GraniteMoeSharedForCausalLM": "granite",
    "Ernie4_5_MoeForCausalLM": "ernie",
    "MiniMaxM2ForCausalLM": "minimax",
}
assert set(FAMILIES) == set(SUPPORTED_ARCHITECTURES), "every supported architecture needs a family module"


def family_module(arch: str) -> ModuleType:
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"no model family registered for {arch}")
    return importlib.import_module(f"models.{FAMILIES[arch]}")


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
    name = canonical_dtype(name)
    if name != "auto":
        return getattr(torch, name)
    ckpt = getattr(torch, canonical_dtype(checkpoint_dtype), torch.float32)
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


def load_model(path: str, dtype: str = "auto", device: str = "auto", progress: bool = True) -> MoEForCausalLM:
    cfg = MoEModelConfig.from_hf(path)
    family = family_module(cfg.architecture)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, cfg.torch_dtype, dev)
    t0 = time.monotonic()
    with torch.device("meta"):
        model = MoEForCausalLM(cfg).to(torch_dtype).restore_fp32_modules()  # no memory yet
    model = model.to_empty(device=dev)
    model.reset_buffers()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    load_weights(model, path, family.weight_map(cfg), progress=progress, quant=cfg.extra.get("quant"))
    model.eval()
    model.load_seconds = time.monotonic() - t0
    return model
