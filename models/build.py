"""`load_model`: a checkpoint directory -> the model on its device, weights loaded, kernels planned.

The steps: the config (`models/hf_config.py`), the family (`models/registry.py`), the module
tree built on the meta device and materialised on the target device, the weights streamed in
(`models/loader.py`), then the kernel plan resolved for that device and dtype and applied
(`models/kernels/plan.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import re
import time

import torch

from models.config import UnsupportedModelError
from models.dtypes import canonical_dtype
from models.gguf_loader import GGUFCheckpoint, GGUFError, gguf_path
from models.hf_config import load_config
from models.kernels.flags import KernelFlags
from models.kernels.plan import (KernelPlan, KernelPlanError, LinearLayout, MoEKernel, bf16_weights_serve,
                                 cpu_has_native_bf16, quantizable, resolve_plan)
from models.kernels.quant import BF16, QUANTIZATIONS, QuantWeight, select_isa
from models.loader import load_weights, plan_quantized
from models.model import MoEForCausalLM
from models.quant import reader_for
from models.quant.weights import QParam
from models.mtp import MultiTokenPredictor, checkpoint_tensor_names, mtp_weight_map, num_mtp_layers
from models.registry import family_for

log = logging.getLogger(__name__)


def resolve_dtype(name: str, checkpoint_dtype: str, device: torch.device,
                  kernels: KernelFlags | None = None) -> torch.dtype:
    """The compute dtype. `auto`: the checkpoint's dtype on CUDA (bf16 if the GPU has it); on the
    CPU float32, except a bf16 checkpoint on a CPU with native bf16 compute where the C kernels do
    not serve (built here and allowed by `kernels`: with them float32 runs the kernels, bf16 compute
    the reference paths, slower). `cpu_bf16_weights` decides first: a bf16 checkpoint's weights stay bf16 with
    float32 math in the C kernels, faster than bf16 compute through the reference paths and than
    float32 weights: docs/benchmarks.md, "bf16 weights on the CPU"). Without native bf16, bf16
    matmuls are far slower (section "Numbers behind code choices")."""
    name = canonical_dtype(name)
    if name != "auto":
        return getattr(torch, name)
    ckpt = getattr(torch, canonical_dtype(checkpoint_dtype), torch.float32)
    if device.type == "cuda":
        if ckpt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return ckpt if ckpt in (torch.bfloat16, torch.float16) else torch.bfloat16
    if ckpt == torch.bfloat16 and cpu_has_native_bf16() and not bf16_weights_serve(kernels):
        return torch.bfloat16
    return torch.float32


def cpu_bf16_weights(dtype: str, checkpoint_dtype: str, device: torch.device, kernels: KernelFlags | None) -> bool:
    """The `--dtype auto` rule for a bf16 checkpoint on the CPU: keep its q/k/v, o, experts, shared
    experts and LM head in bf16, as loaded (half the bytes of float32 copies), and compute in float32
    through the C kernels (csrc/linear_bf16_cpu.c, moe_bf16_cpu.c), wherever they load and the
    kernel flags let them serve. `--dtype float32` keeps float32 weights, `--dtype bfloat16` bf16
    compute. float16 checkpoints load in float32 (bf16 would round their mantissas)."""
    if canonical_dtype(dtype) != "auto" or device.type != "cpu" or canonical_dtype(checkpoint_dtype) != "bfloat16":
        return False
    return bf16_weights_serve(kernels)


# --quantization int4 keeps these weights in int8, as llama-quantize's Q4_0 keeps a MoE model's
# output layer in Q6_K (and its attn_k / attn_v in Q8_0): the LM head, where 4 bits cost the most
# quality. The bundled model's held-out perplexity vs float32 (loadtest quant-quality's protocol):
# int4 throughout +0.139%, LM head int8 +0.048%, q/k/v in int8 too +0.036% (q/k/v alone +0.130%: on
# the 2.4B model 25 MB more read per token for 0.01 points; the LM head's 33 MB buy 0.09)
INT4_MIX: dict[str, tuple[tuple[re.Pattern, str], ...]] = {"int4": ((re.compile(r"lm_head\.weight"), "int8"),)}


def mix_note(formats: dict[str, str]) -> str:
    """The plan's note on the weights a mix keeps in another format."""
    by_fmt: dict[str, list[str]] = {}
    for name, fmt in formats.items():
        by_fmt.setdefault(fmt, []).append(re.sub(r"layers\.\d+\.", "", name))
    return "; ".join(f"{fmt}: {', '.join(sorted(set(names)))}" for fmt, names in sorted(by_fmt.items()))


# torch.nn.init's in-place initializers, which modules' constructors call
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def no_init():
    """Modules built on the meta device skip their random initialization (the loader writes every
    weight): on meta tensors it runs through PyTorch's reference decompositions, whose first use
    imports torch._dynamo and with it Triton, 147 MB of resident memory that a CPU server never
    uses (and seconds of startup). The initializers of torch.nn.init return their tensor as it is
    while this is active, as transformers' `no_init_weights` does."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model.to_empty(device)` without its `empty_like` of meta tensors: that runs through
    PyTorch's Python reference of empty_like, whose first use imports sympy and torch.fx's
    symbolic shapes (470 modules, ~28 MB of a CPU server's resident memory, for nothing).
    Every parameter and buffer gets uninitialized memory of its shape, strides and dtype."""
    return model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def trim_host_heap() -> bool:
    """Give the host heap's free pages back to the system after a load (a garbage collection, then
    glibc's `malloc_trim`): loading leaves freed blocks between live ones in the heap, about 40 MB
    resident for the 2.4B model's int4 load. Returns whether glibc trimmed (False elsewhere)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (host: MemAvailable; None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(model: MoEForCausalLM, device: torch.device, path: str) -> None:
    """Refuse, before allocating, a model whose weights cannot fit the device (a config with a
    huge size would otherwise end in the allocator's traceback), saying what it needs."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    have = available_bytes(device)
    if have is not None and need > have:
        dtype = str(model.embed.weight.dtype).removeprefix("torch.")
        raise UnsupportedModelError(
            f"{path}: the weights need {need / 2**30:.1f} GiB in {dtype} ({sum(p.numel() for p in model.parameters()):,} "
            f"parameters: {model.config.num_layers} layers, {model.config.num_experts} experts of "
            f"{model.config.hidden_size} x {model.config.moe_intermediate_size}); {device} has "
            f"{have / 2**30:.1f} GiB available")


def quantized_params(model: MoEForCausalLM, plan: KernelPlan, groups: dict[str, bool] | None = None) -> list[str]:
    """The names of the parameters `plan` keeps quantized (--quantization; a GGUF file's `groups`)."""
    names = ["lm_head.weight"] if plan.lm_head == LinearLayout.QUANTIZED else []
    # a layer's `quant` says some group of it is quantized: the experts only if they can be (not
    # gpt-oss's biased, clamped experts beside quantized attention)
    experts = quantizable(model.config)["experts"] and (groups is None or bool(groups.get("experts")))
    for i, lk in enumerate(plan.layers):
        if lk.qkv == LinearLayout.QUANTIZED:
            names += [f"layers.{i}.attn.qkv.weight", f"layers.{i}.attn.o_proj.weight"]
        if experts and lk.quant and lk.moe == MoEKernel.CPU and lk.moe_large is None:
            names += [f"layers.{i}.moe.w13", f"layers.{i}.moe.w2"]
        if lk.shared == LinearLayout.QUANTIZED:
            names += [f"layers.{i}.moe.shared.w13.weight", f"layers.{i}.moe.shared.w2.weight"]
        if lk.mlp == LinearLayout.QUANTIZED:  # a dense layer's MLP (bf16 weights)
            names += [f"layers.{i}.mlp.w13.weight", f"layers.{i}.mlp.w2.weight"]
    return names


FP8_QUANTIZATION = "fp8"  # --quantization fp8: experts and linears to fp8_channel at load (QParam)


def load_model(path: str, dtype: str = "auto", device: str = "auto", progress: bool = True,
               kernels: KernelFlags | None = None, mtp: bool = False,
               quantization: str | None = None, keep_quantized: bool = True,
               bf16_weights: bool = True) -> MoEForCausalLM:
    """The model of checkpoint `path`, with the kernel plan that `kernels` (default: every
    choice "auto") resolves to for its device and dtype (`model.kernel_plan`). With `mtp`, the
    checkpoint's multi-token-prediction layers too, as `model.mtp` (models/mtp.py; otherwise the
    loader skips them). `quantization` (a format of models/kernels/quant.py: int8, int4, ...):
    the q/k/v, o, expert, shared expert and LM head weights are quantized as they stream in and
    kept only quantized (CPU, float32 activations; `--dtype auto` then means float32); `fp8`:
    those weights quantized per channel to FP8 as they stream (`models/quant/weights.py`), run by
    `models.quant.ops` on any device. A quantized checkpoint's weights stay in their format where the
    engine runs them so (`models.loader.plan_quantized`), unless `keep_quantized` is off (a float
    copy asked for; expert placement moves the quantized stacks as they are): then they are
    dequantized at load, as the others.
    `path` may name a GGUF checkpoint (models/gguf_loader.py): its Q8_0 / Q4_0 / Q4_1 weights
    stay packed in the formats int8 / int4 / int4_zp, as if `quantization` had made them.
    `dtype` "auto" on the CPU with a bf16 checkpoint (`cpu_bf16_weights`; `bf16_weights` off: not,
    e.g. for expert placement, which moves float stacks): its q/k/v, o, experts, shared experts and
    LM head are held only in bf16 (`model.quantized`, format "bf16"; the loader writes the
    checkpoint's slices into them) and computed in float32 by the C kernels."""
    t0 = time.monotonic()
    file = gguf_path(path)
    gguf = GGUFCheckpoint(file) if file is not None else None
    formats: dict[str, str] = {}  # GGUF: parameter -> the packed format the file gives it
    groups = None
    gguf_mxfp4: list[str] = []
    if gguf is not None:
        if quantization:
            raise GGUFError(f"--quantization {quantization} with a GGUF checkpoint: its tensors keep the formats "
                            f"the file stores (requantize it with llama-quantize)")
        if mtp:
            raise GGUFError("multi-token prediction layers are not read from GGUF checkpoints")
        cfg = gguf.config()
        groups, formats = gguf.plan_formats(cfg, family_for(cfg.architecture).weight_map(cfg), quantizable(cfg))
        # MXFP4 expert stacks our int kernels do not run (gpt-oss's): kept as models/quant mxfp4 QTensors
        gguf_mxfp4 = gguf.mxfp4_params(cfg, family_for(cfg.architecture).weight_map(cfg), groups) \
            if keep_quantized else []
        # the plan's format: the experts' (the bulk of the bytes), else any held
        quantization = next((f for p, f in formats.items() if ".moe.w" in p), next(iter(formats.values()), None))
    else:
        cfg = load_config(path)
    family = family_for(cfg.architecture)
    dev = resolve_device(device)
    if (bf16_weights and not quantization and gguf is None and not mtp and cfg.extra.get("quant") is None
            and cpu_bf16_weights(dtype, cfg.torch_dtype, dev, kernels)):
        quantization = BF16
    torch_dtype = torch.float32 if quantization and canonical_dtype(dtype) == "auto" else resolve_dtype(
        dtype, cfg.torch_dtype, dev, kernels)
    plan = None
    spec = cfg.extra.get("quant")
    fp8 = quantization == FP8_QUANTIZATION
    if fp8:
        quantization = None
    elif quantization and spec is not None:
        log.info("--quantization %s over a %s checkpoint: its weights are dequantized at load, then quantized",
                 quantization, spec.method)
    if spec is not None and not keep_quantized and reader_for(spec) is not None:
        log.info("%s checkpoint loaded with keep_quantized=False: weights dequantized to %s at load",
                 spec.method, str(torch_dtype).removeprefix("torch."))
    if quantization:
        if quantization not in QUANTIZATIONS + (BF16,):
            raise UnsupportedModelError(f"quantization {quantization!r}: one of "
                                        f"{', '.join(QUANTIZATIONS + (FP8_QUANTIZATION,))}")
        try:  # refuses early
            plan = resolve_plan(cfg, dev, torch_dtype, kernels, quantization=quantization, quantized_groups=groups,
                                weight_formats={n: "mxfp4" for n in gguf_mxfp4} if gguf is not None else None)
        except KernelPlanError as e:
            if gguf is None:
                raise
            raise KernelPlanError(f"{file}: its packed GGUF weights run on the quantized CPU kernels: {e}") from None
        select_isa()
    with torch.device("meta"), no_init():
        model = MoEForCausalLM(cfg)
        predictor, mtp_map = None, {}
        if mtp:
            n = num_mtp_layers(cfg)
            mtp_map, own_embed, own_head = mtp_weight_map(family, cfg, n, checkpoint_tensor_names(path))
            predictor = model.mtp = MultiTokenPredictor(cfg, n, model.rotary, own_embed, own_head)
        model = model.to(torch_dtype).restore_fp32_modules()  # no memory yet
    quantized = quantized_params(model, plan, groups if gguf is not None else None) if plan is not None else []
    if gguf is None and quantization in INT4_MIX:
        formats = {n: fmt for n in quantized for pattern, fmt in INT4_MIX[quantization] if pattern.fullmatch(n)}
    kept: dict = {}
    if fp8 or (spec is not None and keep_quantized and not quantization and reader_for(spec) is not None):
        kept, fallback = plan_quantized(path, family.weight_map(cfg), spec if keep_quantized else None,
                                        model.qtensor_candidates(), fp8=fp8)
        if fallback:
            log.info("kept in %s, not quantized (dequantized at load where the checkpoint quantizes them): %s",
                     str(torch_dtype).removeprefix("torch."), ", ".join(fallback))
    if gguf is not None:
        candidates = model.qtensor_candidates()
        kept = {n: ("mxfp4", None, candidates[n][1], {}) for n in gguf_mxfp4 if n in candidates}
    held = {}
    for name in list(quantized) + list(kept):  # kept off the device: only their quantized copy will exist
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        held[name] = (module, attr, module._parameters[attr])
        module._parameters[attr] = None
    check_memory(model, dev, path)  # before the weight map too: its size grows with the experts'
    weight_map = family.weight_map(cfg)  # (a family's own mapping type: Kimi Linear's has aliases)
    weight_map.update(mtp_map)
    model = materialize(model, dev)
    for name, (module, attr, meta) in held.items():
        module._parameters[attr] = meta
        if name in kept:
            fmt, block, bias_column, extras = kept[name]
            model.qweights[name] = QParam.empty(name, tuple(meta.shape), fmt, block, bias_column, torch_dtype, dev,
                                                **extras)
        else:
            model.quantized[name] = QuantWeight.empty(tuple(meta.shape), formats.get(name, quantization))
    model.reset_buffers()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    if gguf is not None:
        gguf.load(model, weight_map, model.quantized, model.qweights)
        mixed = gguf.describe_formats(formats) if len(set(formats.values())) > 1 else None
        gguf.close()
    else:
        load_weights(model, path, weight_map, progress=progress, quant=spec,
                     quantized=model.quantized, qparams=model.qweights)
        mixed = mix_note(formats) if formats else None
    if plan is not None and mixed:  # the plan counted one format: the real bytes
        plan = dataclasses.replace(plan, quantized_bytes=sum(q.nbytes for q in model.quantized.values()),
                                   notes=plan.notes + (mixed,))
    model.eval().requires_grad_(False)  # inference only: no autograd graph, whoever calls it
    if plan is not None:
        model.apply_plan(model.with_weight_bytes(plan))
    else:
        model.plan_kernels(kernels)
    if predictor is not None:
        predictor.bind(model)
        predictor.apply_plan(model.kernel_plan)
    model.load_seconds = time.monotonic() - t0
    return model
