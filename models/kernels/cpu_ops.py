"""The CPU kernels as PyTorch operators: `torch.ops.moe_serve.*` (defined in csrc/ops.cpp).

`load(threading)` builds the library on first use (`cpu_build`), loads it and registers the
ops' fake (meta) implementations, so that `torch.compile` traces through them and
`torch.library.opcheck` checks them. The ops, all functional:

- `paged_decode_cpu(q [B, H, D], k_cache, v_cache [NB, BS, KVH, D], block_tables [B, W],
  seq_lens [B], scale, window=0, chunk=0, sinks [H]?) -> [B, H, D]`: decode attention reading the
  KV blocks in place, with a sliding window / attention chunk (0: none) and per-head sinks; the
  cache float32 or bfloat16 (`--kv-cache-dtype bfloat16`, widened to float32 in the kernel);
- `paged_decode_fp8_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1, v_scale=1,
  window=0, chunk=0, sinks?)`: the same over a float8_e4m3fn cache (`--kv-cache-dtype fp8`),
  keys k8 * k_scale and values v8 * v_scale converted to float32 in the kernel;
- `moe_experts_cpu(x [T, H], topk_ids [T, k], topk_weights [T, k], w13_packed [E, 2I, H],
  w2_packed [E, H, I]) -> [T, H]`: the fused experts over `moe_pack_cpu`'s panels;
- `linear_cpu(x [M, K], weight_packed [N, K], bias [N]?) -> [M, N]` over `linear_pack_cpu`'s panels;
- `moe_experts_variant_cpu(..., w13_bias [E, 2I]?, w2_bias [E, H]?, limit?, alpha, weight_on_input)`:
  the same with the family variants (biases, the clamped SwiGLU, routing weights on the input);
- `moe_route_cpu(logits [T, E], correction_bias [E]?, top_k, scoring, renormalize, renorm_min,
  n_group, topk_group, group_score, scaling) -> (weights [T, k], ids [T, k])`: the router's choice;
- `moe_pack_cpu(w13, w2) -> (w13_packed, w2_packed)`, `linear_pack_cpu(w) -> w_packed`;
- `mla_decode_cpu(q_lat [B, H, R], q_pe [B, H, DR], lat_cache [NB, BS, 1, R], pe_cache [NB, BS, 1,
  PW], block_tables [B, W], seq_lens [B], scale, k_scale=1) -> [B, H, R]`: MLA decode in the absorbed
  form, reading the latent blocks in place (csrc/mla_decode_cpu.c): float32, bfloat16 or
  float8_e4m3fn (values x8 * k_scale) caches, converted in the kernel;
- `quant_linear_cpu`, `quant_moe_cpu`: the same over int8 / int4 weights (models/kernels/quant.py),
  `quant_isa(level) -> [level in use, best level]` (their instruction-set level);
- `fp8_linear_cpu(x, weight [N, K] float8_e4m3fn, scale, bn, bk, bias?)`, `fp8_moe_cpu(x, topk_ids,
  topk_weights, w13, s13, bn13, bk13, w2, s2, bn2, bk2, b13?, b2?, limit?, alpha, weight_on_input)`:
  the same over fp8 weights with scales per bn x bk block, converted in the kernel (csrc/fp8_cpu.c;
  `models.quant.ops` calls them for the fp8 formats on the CPU);
- `linear_bf16_cpu(x [M, K], weight [N/16, ceil(K/2), 16, 2] bfloat16, bias [N]?) -> [M, N]`: bf16 weights in panels,
  float32 math (csrc/linear_bf16_cpu.c), `bf16_isa(level) -> [level in use, best level]`;
- `cpu_kernels_info() -> [built with AVX2 + FMA, threads from PyTorch's OpenMP pool]`.
"""

from __future__ import annotations

import logging
import threading as _threading
from pathlib import Path

import torch

from models.kernels import cpu_build

log = logging.getLogger(__name__)

_lock = _threading.Lock()
_loaded: dict[str, str | None] = {}  # namespace -> threading it was loaded with (None: unavailable)
_origin: dict[str, str] = {}  # namespace -> where its library came from ("prebuilt x86-64-v3", "built here")


def load(threading: str = "auto", namespace: str = cpu_build.NAMESPACE) -> str | None:
    """Build and load the ops once per process: returns their threading ("openmp" | "pthreads"),
    or None where they cannot serve here (no compiler, a failed build, no AVX2 + FMA: logged).
    `threading`: "auto" (PyTorch's OpenMP pool where PyTorch runs libgomp), "openmp" or
    "pthreads". The first load of a namespace decides its threading for the process."""
    with _lock:
        if namespace in _loaded:
            got = _loaded[namespace]
            if got is not None and threading not in ("auto", got):
                log.warning("the CPU kernels are loaded with %s threads already; --cpu-kernels %s applies to a new "
                            "process", got, threading)
            return got
        _loaded[namespace] = _load(threading, namespace)
        return _loaded[namespace]


def origin(namespace: str = cpu_build.NAMESPACE) -> str | None:
    """Where the loaded library came from: "prebuilt <level>" (built ahead of time, e.g. in the
    image) or "built here" (-march=native, compiled or cached); None before a successful load."""
    return _origin.get(namespace) if _loaded.get(namespace) else None


def _find(openmp: bool, namespace: str) -> Path:
    found = cpu_build.prebuilt(openmp, namespace)
    if found is not None:
        _origin[namespace] = f"prebuilt {found[1]}"
        return found[0]
    _origin[namespace] = "built here"
    return cpu_build.build(openmp, namespace)


def _load(threading: str, namespace: str) -> str | None:
    openmp = threading == "openmp" or (threading == "auto" and cpu_build.torch_runs_gomp())
    try:
        try:
            path = _find(openmp, namespace)
        except cpu_build.BuildError as e:
            if not openmp or threading == "openmp":
                raise
            log.warning("building the CPU kernels with OpenMP failed (%s); trying pthreads", e)
            openmp, path = False, _find(False, namespace)
        torch.ops.load_library(str(path))
    except (cpu_build.BuildError, OSError, RuntimeError) as e:
        log.warning("the CPU kernels are not available (%s): the PyTorch paths serve instead", e)
        return None
    ops = getattr(torch.ops, namespace)
    avx2, with_openmp = ops.cpu_kernels_info()
    if not avx2:
        log.warning("this CPU lacks AVX2 + FMA: the PyTorch paths serve instead of the CPU kernels")
        return None
    _register_fakes(namespace)
    return "openmp" if with_openmp else "pthreads"


def ops(namespace: str = cpu_build.NAMESPACE):
    """`torch.ops.<namespace>` (after `load`)."""
    return getattr(torch.ops, namespace)


def _register_fakes(ns: str) -> None:
    def fake(name):
        return torch.library.register_fake(f"{ns}::{name}")

    @fake("paged_decode_cpu")
    def _(q, k_cache, v_cache, block_tables, seq_lens, scale, window=0, chunk=0, sinks=None):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @fake("paged_decode_fp8_cpu")
    def _(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=1.0, v_scale=1.0, window=0, chunk=0,
          sinks=None):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @fake("moe_experts_cpu")
    def _(x, topk_ids, topk_weights, w13_packed, w2_packed):
        return x.new_empty(x.shape[0], x.shape[1])

    @fake("moe_experts_variant_cpu")
    def _(x, topk_ids, topk_weights, w13_packed, w2_packed, w13_bias, w2_bias, limit, alpha, weight_on_input):
        return x.new_empty(x.shape[0], x.shape[1])

    @fake("moe_experts_bf16_cpu")
    def _(x, topk_ids, topk_weights, w13, w2):
        return x.new_empty(x.shape[0], x.shape[1])

    @fake("moe_route_cpu")
    def _(logits, correction_bias, top_k, scoring, renormalize, renorm_min, n_group, topk_group, group_score,
          scaling):
        return (logits.new_empty(logits.shape[0], top_k),
                logits.new_empty(logits.shape[0], top_k, dtype=torch.long))

    @fake("moe_pack_cpu")
    def _(w13, w2):
        return (torch.empty_like(w13, memory_format=torch.contiguous_format),
                torch.empty_like(w2, memory_format=torch.contiguous_format))

    @fake("linear_cpu")
    def _(x, weight_packed, bias):
        return x.new_empty(x.shape[0], weight_packed.shape[0])

    @fake("linear_pack_cpu")
    def _(weight):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    @fake("mla_decode_cpu")
    def _(q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, scale, k_scale=1.0):
        return q_lat.new_empty(q_lat.shape)

    @fake("quant_linear_cpu")
    def _(x, qweight, scales, mins, fmt, bias):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @fake("quant_moe_cpu")
    def _(x, topk_ids, topk_weights, fmt, q13, s13, m13, q2, s2, m2):
        return x.new_empty(x.shape[0], x.shape[1])

    @fake("fp8_linear_cpu")
    def _(x, weight, scale, bn, bk, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @fake("fp8_moe_cpu")
    def _(x, topk_ids, topk_weights, w13, s13, bn13, bk13, w2, s2, bn2, bk2, b13, b2, limit, alpha, weight_on_input):
        return x.new_empty(x.shape[0], x.shape[1])

    @fake("linear_bf16_cpu")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], 16 * weight.shape[0])

    @fake("rmsnorm_cpu")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @fake("add_rmsnorm_cpu")
    def _(x, residual, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @fake("rope_write_kv_cpu")
    def _(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim, q_norm, k_norm, eps):
        return qkv.new_empty(qkv.shape[0], num_heads, head_dim)


def available(namespace: str = cpu_build.NAMESPACE) -> bool:
    """Whether the ops of `namespace` are loaded in this process (a successful `load`)."""
    return bool(_loaded.get(namespace))
