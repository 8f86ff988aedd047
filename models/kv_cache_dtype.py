"""`--kv-cache-dtype` (vLLM's flag, names and meaning): what the paged KV cache stores.

- `auto`: the model dtype (K and V as the attention computes them).
- `bfloat16`: bfloat16 whatever the model dtype. On the CPU, where the engine computes in
  float32, this halves the cache (llama.cpp's default F16 cache takes as many bytes): a write
  rounds to nearest even, a read widens exactly (the C decode kernel shifts the 16 bits into a
  float32's upper half in registers). On a bfloat16 model it is `auto`.
- `fp8` / `fp8_e4m3`: float8_e4m3fn with one scale per tensor and layer (`k_scale`, `v_scale`):
  a write stores `x / scale` saturated to +-448, a read gives `x8 * scale` back in the model dtype
  (models/layers/paged.py; the decode kernels convert in the kernel). The scales are 1.0, as in
  vLLM, unless the checkpoint carries `k_scale` / `v_scale` (or a shared `kv_scale`) tensors for
  the layer's attention (`checkpoint_kv_scales`). A value then takes 1 byte: half of bf16's, a
  quarter of float32's, so the same `--kv-cache-memory` holds 2x (bf16 models) or 4x (float32
  models) the blocks.

The state slots of linear-attention layers stay in the model dtype. MLA's latent cache
(DeepSeek, Kimi K2, GLM-5 ...) takes every format: the latent and the rotary key (with DSA's
index key) of a token are one cache entry, as in vLLM, so an fp8 one shares the layer's k_scale;
the C and Triton MLA decode kernels convert in the kernel, the PyTorch paths after the read.
"""

from __future__ import annotations

import logging
import re

import torch

from models.layers.paged import FP8_KV_DTYPE, KVScales

log = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3")  # vLLM's CacheDType names (no fp8_e5m2 here)
FP8_NAMES = ("fp8", "fp8_e4m3")

# vLLM's checkpoint names for the KV-cache scales of layer N's attention (compressed-tensors and
# ModelOpt: on k_proj / v_proj; older exports: on self_attn, or one kv_scale for both)
_SCALE_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:k_proj\.|v_proj\.|attn\.)?(k_scale|v_scale|kv_scale)$")


class KVCacheDtypeError(ValueError):
    pass


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element dtype for a `--kv-cache-dtype` name."""
    if name == "auto":
        return model_dtype
    if name in FP8_NAMES:
        return FP8_KV_DTYPE
    if name == "bfloat16":
        return torch.bfloat16
    raise KVCacheDtypeError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """How /version, the log and the metrics name a cache dtype: float8_e4m3fn, bfloat16, ..."""
    return str(dtype).replace("torch.", "")


def checkpoint_kv_scales(path: str) -> dict[int, KVScales]:
    """Layer index -> (k_scale, v_scale) for the layers whose checkpoint tensors carry them
    (a missing half stays 1.0; `kv_scale` sets both). Reads only those scalars."""
    from safetensors import safe_open

    from models.loader import checkpoint_files

    found: dict[int, dict[str, float]] = {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                m = _SCALE_NAME.search(name)
                if m is None:
                    continue
                value = float(handle.get_tensor(name).float().reshape(-1).max())
                if not (value > 0 and value < float("inf")):
                    raise KVCacheDtypeError(f"{name} = {value} in {file}: a KV-cache scale must be finite and > 0")
                keys = ("k_scale", "v_scale") if m.group(2) == "kv_scale" else (m.group(2),)
                for key in keys:
                    found.setdefault(int(m.group(1)), {})[key] = value
    return {i: (s.get("k_scale", 1.0), s.get("v_scale", 1.0)) for i, s in found.items()}


def configure_kv_cache(model, name: str, path: str | None = None) -> torch.dtype:
    """Set what `model`'s paged KV cache stores (`model.kv_cache_dtype`, read by
    `allocate_kv_cache` and `kv_bytes_per_block`) and, for fp8, each attention layer's scales
    (from the checkpoint at `path` where it has them). Returns the cache dtype."""
    model_dtype = model.embed.weight.dtype
    dtype = kv_cache_torch_dtype(name, model_dtype)
    model.kv_cache_dtype = dtype
    if dtype != FP8_KV_DTYPE:
        return dtype
    mla = model.config.mla is not None
    scales = checkpoint_kv_scales(path) if path else {}
    kv_layers = model.kv_layers()
    for i in kv_layers:
        k_scale, v_scale = scales.get(i, (1.0, 1.0))
        # MLA: one scale for the latent and the rotary key (one entry in vLLM's cache: its k_scale)
        model.layers[i].attn.kv_scales = (k_scale, k_scale) if mla else (k_scale, v_scale)
    if scales:
        log.info("--kv-cache-dtype %s: the checkpoint's k_scale / v_scale for %d of %d attention layers "
                 "(the others 1.0)", name, len(set(scales) & set(kv_layers)), len(kv_layers))
    else:
        log.warning("--kv-cache-dtype %s: the checkpoint has no k_scale / v_scale: using scaling factor 1.0 for "
                    "every layer (as vLLM does); keys and values beyond +-448 saturate", name)
    return dtype
