"""The kernel plan: the one place where (device, dtype, model config, flags, memory budget)
becomes each layer's kernels, resolved once when the model is loaded.

`resolve_plan` returns a `KernelPlan`; `MoEForCausalLM.apply_plan` hands every layer its
`LayerKernels` and makes the packed weight copies the plan asks for. No layer chooses or
demotes a kernel itself and nothing here is decided in a forward pass. The engine finishes the
plan with `KernelPlan.for_engine` (expert placement, expert capacity, --enforce-eager), which
decides whether decode steps replay CUDA graphs. The plan is logged at startup (`table`) and
served by `GET /version` (`to_dict`).

The rules, per layer kind:
- attention: GQA layers, plain or with a variant (sliding window, chunked attention, sinks,
  output gate), decode with the Triton kernel on CUDA or the C kernel on the CPU (float32),
  which take the variant; so do MLA layers, with their own kernels (absorbed form over the
  latent cache, models/kernels/mla_decode.py); MLA with DSA's top-k selection has one PyTorch
  path ("reference");
- experts: plain SwiGLU experts run the Triton grouped GEMM on CUDA (`torch._grouped_mm` on
  Hopper without Triton), the C kernel on the CPU (float32, sizes multiples of its panel) up to
  `CPU_KERNEL_PAIRS_PER_EXPERT` token-expert pairs per expert and the per-expert loop above
  (oneDNN's GEMMs are faster there: docs/benchmarks.md, section "CPU kernels"); family variants (biases, clamped
  SwiGLU, input scaling) run in the Triton and the C kernel too (`torch._grouped_mm` has none: the loop),
  the C kernel at every batch size (their loop is slower at every size);
- the router's choice (softmax or sigmoid, correction bias, groups, top-k): one Triton launch on
  CUDA, the C op on the CPU;
- linear layers on the CPU (float32): the LM head, q/k/v, o and the loop's gate+up weights are
  kept in a packed copy (C panels, oneDNN's layout where the panels do not fit) while the copies
  stay within `PACKED_BYTES_AUTO`; over it, plain weights and the loop for the experts;
- `--quantization int8|int4|...` (CPU, float32 activations, the C kernels built here): q/k/v and o
  of GQA layers, plain SwiGLU experts (the C experts kernel at every batch size), shared experts
  and an untied LM head whose input sizes are multiples of 32 are kept only quantized
  (`models/kernels/quant.py`: the quantized weight replaces the float one, so no budget applies);
  the rest (norms, router, embedding, MLA, linear attention, expert variants) stays float32;
- bf16 weights with float32 math (`quantization="bf16"`: `--dtype auto` on a bf16 checkpoint on the
  CPU, models/build.py): the same groups kept only in bf16, as the checkpoint stores them, for the
  C kernels (csrc/linear_bf16_cpu.c, whose output sizes must be multiples of 16, and the bf16
  experts kernel csrc/moe_bf16_cpu.c at every batch size, plain SwiGLU experts); the plan names
  the format "bf16 (fp32 math)";
- weights a quantized checkpoint ships (FP8 block / channel / tensor, MXFP4) or `--quantization fp8`
  gives (`weight_formats`: parameter name -> `models.quant.formats.WeightFormat`, those the loader
  kept in their format): they run `models.quant.ops` (the Triton kernels on CUDA, which then need
  Triton; on the CPU the C fp8 kernels for the fp8 formats where the C kernels are built, experts
  "cpu" at every batch size (`fp8_cpu_kernels`; a note names the path), else the torch reference,
  dequantizing per call only what a batch uses), experts with the layer's variant; the plan names a `WeightFormat` per layer group (attention linears,
  experts, shared expert) and for the LM head ("bf16": the compute dtype, not quantized), and the
  resident weight bytes (`weight_bytes`: quantized tensors plus float weights; `quantized_bytes`:
  the quantized ones) once the model holds them (`MoEForCausalLM.plan_kernels`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import logging
import re
from dataclasses import dataclass, field, replace
from collections.abc import Mapping
from enum import Enum

import torch

from models.config import MoEModelConfig
from models.kernels.flags import KernelFlags

log = logging.getLogger(__name__)

PACKED_BYTES_AUTO = 2**30  # "auto" packs CPU weights while the extra copies stay under this
# the CPU experts kernel serves up to this many token-expert pairs per expert on average; the
# loop above (docs/benchmarks.md, section "CPU kernels": the benchmark CPU, H 512, I 1024, top-2 of 8)
CPU_KERNEL_PAIRS_PER_EXPERT = 64
PANEL = 16  # the C kernels' panel width (NR in csrc/panel_gemm.h)


class AttentionKernel(str, Enum):
    TRITON = "triton"  # Triton paged decode (CUDA; CPU tensors under TRITON_INTERPRET=1)
    CPU = "cpu"  # the C paged decode kernel (float32)
    REFERENCE = "reference"  # PyTorch: gather the blocks, then SDPA (variants and MLA: their own path)
    # (MLA layers given TRITON or CPU run its MLA kernels, models/kernels/mla_decode.py)


class MoEKernel(str, Enum):
    TRITON = "triton"  # Triton grouped GEMM, gate+up with SiLU-and-mul fused
    GROUPED_MM = "grouped_mm"  # torch._grouped_mm over the pairs sorted by expert (Hopper, bf16)
    CPU = "cpu"  # the C experts kernel over packed weights (float32)
    LOOP = "loop"  # one matmul pair per active expert (family variants too)
    REFERENCE = "reference"  # transformers' formulation, a mask per expert


class LinearLayout(str, Enum):
    PANELS = "panels"  # the C kernel's [out/16, in, 16] panels
    ONEDNN = "onednn"  # oneDNN's blocked layout
    PLAIN = "plain"  # the weight as loaded (F.linear)
    QUANTIZED = "quantized"  # only an int8 / int4 copy (models/kernels/quant.py), the C kernels


# the kernels that also run the family variants (biases, clamped SwiGLU, input scaling)
VARIANT_KERNELS = frozenset({MoEKernel.TRITON, MoEKernel.CPU, MoEKernel.LOOP})
# kernels that never read a device value back to the host (a CUDA graph can capture them)
SYNC_FREE = frozenset({AttentionKernel.TRITON, AttentionKernel.CPU, MoEKernel.TRITON, MoEKernel.GROUPED_MM,
                       MoEKernel.CPU})


@functools.lru_cache(maxsize=2)
def triton_available(load: bool = True) -> bool:
    """Whether Triton imports (`load`: a GPU plan, whose kernels are Triton's), or, without
    importing it, whether it is installed (the CPU, where a plan runs Triton only under the
    interpreter when asked: importing it would map libtriton, ~70 MB of a CPU server's resident
    memory; the Triton kernels' modules import it where a plan chooses them)."""
    if not load:
        try:
            return importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except RuntimeError:
        return False


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fp8_dots(device: torch.device) -> bool:
    """Whether `device` multiplies float8 x float8 in the Triton kernels: CUDA capability 8.9+ (Ada,
    Hopper, Blackwell); the CPU's Triton interpreter too. Below, the fp8 formats run W8A16."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class Capabilities:
    """What this process can run on the model's device."""

    device_type: str
    triton: bool = False
    grouped_mm: bool = False  # torch._grouped_mm in this dtype (Hopper and newer, bf16)
    cpu_kernels: str | None = None  # the C kernels' threading ("openmp" | "pthreads"), None: not built
    onednn: bool = False
    cpu_kernels_origin: str | None = None  # "prebuilt x86-64-v3" (ahead of time) or "built here"

    @classmethod
    def detect(cls, device: torch.device, dtype: torch.dtype, cpu_kernels: str = "auto") -> Capabilities:
        if device.type == "cuda":
            grouped = (dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                       and torch.cuda.get_device_capability(device)[0] >= 9)
            return cls("cuda", triton=triton_available(), grouped_mm=grouped)
        from models.kernels import cpu_ops

        threading = None if cpu_kernels == "off" else cpu_ops.load(cpu_kernels)
        return cls(device.type, triton=triton_available(load=False), cpu_kernels=threading, onednn=onednn_available(),
                   cpu_kernels_origin=cpu_ops.origin() if threading else None)


@dataclass(frozen=True)
class LayerKernels:
    """One decoder layer's kernels."""

    # "gqa", "gqa+window", "gqa+chunked", "gqa+sinks", "gqa+gate" (combined with +), "mla", "linear (gated deltanet)",
    # "mamba2", "linear (kimi delta attention)"
    attention_kind: str
    attention: AttentionKernel  # the decode kernel
    fused_rope: bool  # q/k norm + rotary + KV store in one op (KernelPlan.fused_ops: Triton or C)
    fused_norms: bool  # RMSNorm with the residual add in one op
    qkv: LinearLayout  # GQA layers' q/k/v and o projections (MLA: its q, q_a, q_b and kv_a projections, and o)
    o: LinearLayout
    expert_kind: str | None  # "swiglu", or the family variant ("biased clamped swiglu", ...); None: dense MLP
    moe: MoEKernel | None
    moe_large: MoEKernel | None = None  # MoEKernel.CPU: the kernel above `CPU_KERNEL_PAIRS_PER_EXPERT`
    gate_up: LinearLayout = LinearLayout.PLAIN  # the loop's per-expert gate+up weights
    # the router's expert choice: "triton" (CUDA), "cpu" (the C op), "reference" (PyTorch ops)
    router: str = "reference"
    shared: LinearLayout = LinearLayout.PLAIN  # the shared expert's weights
    quant: str | None = None  # the format of the layer's quantized weights (--quantization), None: none
    # WeightFormat per group (models.quant.formats; "bf16": the compute dtype), several joined by "+"
    attn_format: str = "bf16"  # q/k/v and o (MLA: its projections)
    experts_format: str | None = None  # the expert stacks' (a dense layer: its MLP's)
    shared_format: str | None = None  # the shared expert's (None: none)
    mlp: LinearLayout = LinearLayout.PLAIN  # a dense layer's MLP (QUANTIZED: bf16 weights, `bf16_groups`)

    @property
    def sync_free(self) -> bool:
        return self.attention in SYNC_FREE and (self.moe is None or (self.moe in SYNC_FREE and self.moe_large is None))


@dataclass(frozen=True)
class KernelPlan:
    device: str
    dtype: str
    flags: KernelFlags
    capabilities: Capabilities
    layers: tuple[LayerKernels, ...]
    lm_head: LinearLayout
    # the kernel per device type for experts run by the placement executor (device subsets of
    # the stacks, no packed copies): ((device type, kernel), ...)
    placed_moe: tuple[tuple[str, MoEKernel], ...]
    packed_bytes: int  # the packed copies' extra memory
    cuda_graphs: bool  # decode steps replay CUDA graphs
    notes: tuple[str, ...] = field(default=())  # why a choice was made (demotions, graphs off)
    experts_placed: bool = False  # the engine placed experts across devices (for_engine)
    quantization: str | None = None  # --quantization: the format of the quantized weights
    quantized_bytes: int = 0  # what the quantized weights take (they replace the float ones)
    # the CPU expert tier (placement, --cpu-expert-format): its experts' format, their bytes in it
    # (all MoE layers), and whether it computes from the model's own weights (no copy beside them)
    cpu_tier: str | None = None
    cpu_tier_bytes: int = 0
    cpu_tier_in_place: bool = False
    lm_head_format: str = "bf16"  # the LM head's WeightFormat
    weight_bytes: int = 0  # resident weights (quantized + float), once the model holds them; 0: not counted
    # what runs the layers' fused_rope / fused_norms: "triton" (CUDA; the interpreter in tests),
    # "cpu" (the C ops of csrc/norm_rope_cpu.c, float32) or None (the PyTorch ops)
    fused_ops: str | None = None

    def placed_kernel(self, device_type: str) -> MoEKernel:
        return dict(self.placed_moe)[device_type]

    def for_engine(self, *, placed: bool = False, capacity_limited: bool = False,
                   enforce_eager: bool = False, host_tier: bool = False, several_gpus: bool = False,
                   graphs_across_gpus: bool = False) -> KernelPlan:
        """The plan as the engine runs it: CUDA graphs only where every decode step is sync-free
        and padding a batch to a graph bucket changes nothing. Placed experts (`placed`) keep
        them: the executor dispatches decode steps with no host sync. The CPU expert tier
        (`host_tier`: the host computes experts in the middle of each step) keeps them too, as
        piecewise graphs cut at the host's calls (models/placement/piecewise.py). Experts on
        several GPUs (`several_gpus`) run eagerly unless `graphs_across_gpus`: their pieces
        launch the other GPU's experts between replays, which has not been run on two GPUs yet
        (their steps are sync-free either way, so the GPUs still overlap)."""
        placed = placed or host_tier or several_gpus
        reasons = [why for why, on in (
            ("--enforce-eager", enforce_eager),
            ("experts on several GPUs (piecewise graphs across GPUs are not verified yet)",
             several_gpus and not graphs_across_gpus),
            ("expert capacity depends on the step's token count, which graph buckets pad", capacity_limited),
        ) if on and self.cuda_graphs]
        notes = tuple(f"CUDA graphs off: {r}" for r in reasons)
        if self.cuda_graphs and not reasons and (host_tier or several_gpus):
            cut = "the CPU expert tier's calls" if host_tier else ""
            cut += (" and " if cut else "") + ("the other GPUs' experts" if several_gpus else "")
            note = f"CUDA graphs piecewise: decode steps cut at {cut}"
            notes += (note,) if note not in self.notes else ()
        if not notes and placed <= self.experts_placed:
            return self
        return replace(self, cuda_graphs=self.cuda_graphs and not reasons, experts_placed=self.experts_placed or placed,
                       notes=self.notes + notes)

    # -- reporting ------------------------------------------------------------------------------
    def layer_groups(self) -> list[tuple[int, int, LayerKernels]]:
        """(first, last, kernels) for runs of consecutive layers with the same kernels."""
        groups: list[tuple[int, int, LayerKernels]] = []
        for i, lk in enumerate(self.layers):
            if groups and groups[-1][2] == lk:
                groups[-1] = (groups[-1][0], i, lk)
            else:
                groups.append((i, i, lk))
        return groups

    def table(self) -> str:
        caps = self.capabilities
        c_kernels = caps.cpu_kernels or "not built" if caps.device_type == "cpu" else "-"
        if caps.device_type == "cpu" and caps.cpu_kernels and caps.cpu_kernels_origin:
            c_kernels += f" ({caps.cpu_kernels_origin})"
        quant = f"; weights: {weights_label(self.quantization)}" if self.quantization else ""
        lines = [f"kernel plan ({self.device}, {self.dtype}{quant}; C kernels: {c_kernels}; triton: "
                 f"{'yes' if caps.triton else 'no'}; flags: {_flags_text(self.flags)})",
                 "| layers | attention | fused rope / norms | q/k/v, o | experts | expert gate+up | weights |",
                 "|---|---|---|---|---|---|---|"]
        fused = "C" if self.fused_ops == "cpu" else "Triton"
        for first, last, lk in self.layer_groups():
            experts = ("dense MLP" + (f" ({weights_label(lk.quant)})" if lk.mlp == LinearLayout.QUANTIZED else "")
                       if lk.moe is None else f"{lk.expert_kind}: {lk.moe.value}" + (
                f" (up to {CPU_KERNEL_PAIRS_PER_EXPERT} pairs/expert, {lk.moe_large.value} above)"
                if lk.moe_large is not None else "") + (
                f"; shared expert: {lk.shared.value}" if lk.shared not in (LinearLayout.PLAIN, LinearLayout.QUANTIZED)
                else ""))
            lines.append(f"| {first}-{last} | {lk.attention_kind}: {lk.attention.value} | "
                         f"{fused if lk.fused_rope else 'no'} / {fused if lk.fused_norms else 'no'} | "
                         f"{_lv(lk.qkv, lk)}, {_lv(lk.o, lk)} | {experts}{_quant_note(lk)} | "
                         f"{lk.gate_up.value if lk.moe == MoEKernel.LOOP or lk.moe_large else '-'} | "
                         f"{_formats_text(lk)} |")
        placed = ", ".join(f"{d}: {k.value}" for d, k in self.placed_moe)
        lm_head = self.lm_head.value if self.lm_head != LinearLayout.QUANTIZED else (
            weights_label(self.quantization) if self.quantization else self.lm_head_format)
        if self.lm_head_format != "bf16" and self.lm_head != LinearLayout.QUANTIZED:
            lm_head += f" ({self.lm_head_format})"
        if self.quantization or self.quantized_bytes:
            held = "bf16" if self.quantization == BF16_WEIGHTS else "quantized"
            lm_head += f"; {held} weights: {self.quantized_bytes / 2**20:.1f} MiB"
        if self.weight_bytes:
            lm_head += f"; resident weights: {self.weight_bytes / 2**20:.1f} MiB"
        lines.append(f"LM head: {lm_head}; packed copies: {self.packed_bytes / 2**20:.1f} MiB; "
                     f"placed experts: {placed}; CUDA graphs: {'on' if self.cuda_graphs else 'off'}")
        if self.cpu_tier:
            lines.append(f"CPU expert tier: {self.cpu_tier}, {self.cpu_tier_bytes / 2**20:.1f} MiB "
                         f"({'the model weights in place' if self.cpu_tier_in_place else 'a copy'})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        caps = self.capabilities
        return {
            "device": self.device, "dtype": self.dtype, "flags": vars(self.flags).copy(),
            "capabilities": {"triton": caps.triton, "grouped_mm": caps.grouped_mm, "cpu_kernels": caps.cpu_kernels,
                             "cpu_kernels_origin": caps.cpu_kernels_origin, "onednn": caps.onednn},
            "layers": [{"layers": [first, last], "attention_kind": lk.attention_kind, "attention": lk.attention.value,
                        "fused_rope": lk.fused_rope, "fused_norms": lk.fused_norms, "qkv": lk.qkv.value,
                        "o": lk.o.value, "expert_kind": lk.expert_kind,
                        "moe": None if lk.moe is None else lk.moe.value,
                        "moe_large": None if lk.moe_large is None else lk.moe_large.value,
                        "moe_large_above_pairs_per_expert": CPU_KERNEL_PAIRS_PER_EXPERT if lk.moe_large else None,
                        "gate_up": lk.gate_up.value, "router": lk.router, "shared": lk.shared.value,
                        "mlp": lk.mlp.value,
                        "quantization": lk.quant,
                        "weight_formats": {"attention": lk.attn_format, "experts": lk.experts_format,
                                           "shared": lk.shared_format}}
                       for first, last, lk in self.layer_groups()],
            "lm_head": self.lm_head.value, "placed_moe": {d: k.value for d, k in self.placed_moe},
            "packed_bytes": self.packed_bytes, "cuda_graphs": self.cuda_graphs, "experts_placed": self.experts_placed,
            "fused_ops": self.fused_ops if any(lk.fused_rope or lk.fused_norms for lk in self.layers) else None,
            "notes": list(self.notes), "quantization": self.quantization, "quantized_bytes": self.quantized_bytes,
            "weights": weights_label(self.quantization) if self.quantization else self.dtype,
            "cpu_tier": None if not self.cpu_tier else {"format": self.cpu_tier, "bytes": self.cpu_tier_bytes,
                                                        "in_place": self.cpu_tier_in_place},
            "lm_head_format": self.lm_head_format, "weight_bytes": self.weight_bytes,
        }


BF16_WEIGHTS = "bf16"  # models.kernels.quant.BF16: bf16 weights, float32 math (not imported: quant imports torch ops)


def weights_label(fmt: str | None) -> str:
    """How the plan names a CPU weight format: "bf16 (fp32 math)" for bf16 weights, else the format."""
    return "bf16 (fp32 math)" if fmt == BF16_WEIGHTS else str(fmt)


def _lv(layout: LinearLayout, lk: LayerKernels) -> str:
    return weights_label(lk.quant) if layout == LinearLayout.QUANTIZED and lk.quant else layout.value


def _formats_text(lk: LayerKernels) -> str:
    parts = [f"attention {lk.attn_format}"]
    if lk.experts_format is not None:
        parts.append(f"{'experts' if lk.moe is not None else 'mlp'} {lk.experts_format}")
    if lk.shared_format is not None:
        parts.append(f"shared {lk.shared_format}")
    return ", ".join(parts)


def _quant_note(lk: LayerKernels) -> str:
    parts = [what for what, on in (("experts", lk.moe is not None and lk.moe_large is None and lk.quant
                                                and lk.moe == MoEKernel.CPU),
                                   ("shared expert", lk.shared == LinearLayout.QUANTIZED)) if on]
    return f" ({' and '.join(parts)} {weights_label(lk.quant)})" if parts and lk.quant else ""


def _flags_text(flags: KernelFlags) -> str:
    forced = [f"{k}={v}" for k, v in vars(flags).items() if v != "auto"]
    return ", ".join(forced) or "all auto"


# -- resolution ---------------------------------------------------------------------------------
class KernelPlanError(ValueError):
    """A forced kernel choice cannot serve this model here (the message says why)."""


def attention_kind(cfg: MoEModelConfig, layer: int) -> str:
    if cfg.layer_kind(layer) == "linear":
        return "linear (gated deltanet)"
    if cfg.layer_kind(layer) == "mamba":
        return "mamba2"
    if cfg.layer_kind(layer) == "kda":
        return "linear (kimi delta attention)"
    if cfg.mla is not None:
        return "mla+dsa" if cfg.dsa is not None else "mla"
    parts = ["gqa"]
    if cfg.sliding_window(layer) is not None:
        parts.append("window")
    if cfg.attention_chunk(layer) is not None:
        parts.append("chunked")
    if cfg.attention_sinks:
        parts.append("sinks")
    if cfg.attn_output_gate:
        parts.append("gate")
    return "+".join(parts)


def expert_kind(cfg: MoEModelConfig) -> str:
    parts = [p for p, on in (("biased", cfg.expert_bias), ("clamped", cfg.swiglu_limit is not None),
                             ("input-scaled", cfg.expert_input_scaling)) if on]
    return " ".join(parts + ["swiglu"])


def _attention(flags: KernelFlags, caps: Capabilities, dtype: torch.dtype) -> AttentionKernel:
    """The decode kernel of plain GQA layers."""
    choice = flags.attention
    if choice == "auto":
        if caps.device_type == "cuda":
            return AttentionKernel.TRITON if caps.triton else AttentionKernel.REFERENCE
        return AttentionKernel.CPU if dtype == torch.float32 and caps.cpu_kernels else AttentionKernel.REFERENCE
    if choice == "triton" and not caps.triton:
        raise KernelPlanError("--attention-backend triton: Triton is not installed")
    if choice == "cpu" and not (caps.device_type == "cpu" and dtype == torch.float32 and caps.cpu_kernels):
        raise KernelPlanError("--attention-backend cpu: needs float32 on the CPU and the C kernels built here "
                              f"(device {caps.device_type}, dtype {dtype}, C kernels {caps.cpu_kernels or 'not built'})")
    return AttentionKernel(choice)


def _router(caps: Capabilities) -> str:
    """The router's kernel: one Triton launch on CUDA, the C op on the CPU (its logits are float32
    in every dtype), else PyTorch's ops."""
    if caps.device_type == "cuda":
        return "triton" if caps.triton else "reference"
    return "cpu" if caps.cpu_kernels is not None else "reference"


def host_experts_kernel_loads() -> bool:
    """Whether the C experts kernel loads in this process: an accelerator's plan names it for the
    CPU expert tier (`placed_moe`) without loading it; the placement executor asks here before
    packing the tier (the kernels are built or loaded then, once)."""
    from models.kernels import cpu_ops

    return cpu_ops.load() is not None


def cpu_moe_fits(cfg: MoEModelConfig) -> bool:
    return cfg.hidden_size % PANEL == 0 and cfg.moe_intermediate_size % PANEL == 0


def _moe(flags: KernelFlags, caps: Capabilities, dtype: torch.dtype, cfg: MoEModelConfig) -> MoEKernel:
    """The kernel of plain SwiGLU experts on the model's device."""
    choice = flags.moe
    cpu_ok = caps.device_type == "cpu" and dtype == torch.float32 and caps.cpu_kernels is not None
    if choice == "auto":
        if caps.device_type == "cuda":
            if caps.triton:
                return MoEKernel.TRITON
            return MoEKernel.GROUPED_MM if caps.grouped_mm else MoEKernel.REFERENCE
        return MoEKernel.CPU if cpu_ok and cpu_moe_fits(cfg) else MoEKernel.LOOP
    if choice == "triton" and not caps.triton:
        raise KernelPlanError("--moe-backend triton: Triton is not installed")
    if choice == "grouped_mm" and not caps.grouped_mm:
        raise KernelPlanError("--moe-backend grouped_mm: needs bf16 on a CUDA GPU of compute capability 9.0+")
    if choice == "cpu" and not (cpu_ok and cpu_moe_fits(cfg)):
        raise KernelPlanError(f"--moe-backend cpu: needs float32 on the CPU, the C kernels built here and hidden "
                              f"and expert intermediate sizes that are multiples of {PANEL} (device "
                              f"{caps.device_type}, dtype {dtype}, C kernels {caps.cpu_kernels or 'not built'}, "
                              f"sizes {cfg.hidden_size} and {cfg.moe_intermediate_size})")
    return MoEKernel(choice)


def _layout(flags: KernelFlags, caps: Capabilities, out_features: int) -> LinearLayout:
    """The packed layout of a CPU weight with `out_features` rows (before the budget check)."""
    panels = caps.cpu_kernels is not None and out_features % PANEL == 0
    if flags.cpu_linear == "onednn" and caps.onednn:
        return LinearLayout.ONEDNN
    if panels:
        return LinearLayout.PANELS
    return LinearLayout.ONEDNN if caps.onednn else LinearLayout.PLAIN


QUANT_GROUP = 32  # the quantized formats' group size: input sizes must be multiples of it
QUANT_ROWS = 8  # and their kernel order's row group (csrc/quant_gemm.h): output sizes must be multiples of it


def mla_projections(cfg: MoEModelConfig) -> list[tuple[int, int]]:
    """(rows, in) of an MLA layer's projections of the hidden state and the q latent that the
    plan packs (q, or q_a and q_b; kv_a); o_proj besides. [] without MLA."""
    m = cfg.mla
    if m is None:
        return []
    H, q_rows = cfg.hidden_size, cfg.num_heads * m.qk_head_dim
    q = [(q_rows, H)] if m.q_lora_rank is None else [(m.q_lora_rank, H), (q_rows, m.q_lora_rank)]
    return q + [(m.kv_lora_rank + m.qk_rope_head_dim, H)]


def quantizable(cfg: MoEModelConfig) -> dict[str, bool]:
    """Which weights `--quantization` quantizes (their input sizes are multiples of the group, their
    output sizes of the kernel order's row group)."""
    g, r = QUANT_GROUP, QUANT_ROWS
    variant = cfg.expert_bias or cfg.swiglu_limit is not None or cfg.expert_input_scaling
    shared = cfg.shared_expert_intermediate_size or 0
    qkv_rows = cfg.q_size * (2 if cfg.attn_output_gate else 1) + 2 * cfg.kv_size
    return {"attention": cfg.mla is None and cfg.hidden_size % g == 0 and cfg.q_size % g == 0 and qkv_rows % r == 0,
            "experts": not variant and cfg.hidden_size % g == 0 and cfg.moe_intermediate_size % g == 0,
            "shared": bool(shared) and cfg.hidden_size % g == 0 and shared % g == 0,
            "lm_head": not cfg.tie_word_embeddings and cfg.hidden_size % g == 0 and cfg.vocab_size % r == 0}


def bf16_groups(cfg: MoEModelConfig) -> dict[str, bool]:
    """Which weights bf16 weights with float32 math keep in bf16 (`quantizable`'s groups): linears
    whose output sizes are multiples of the bf16 kernel's panel (any input size), plain SwiGLU
    experts the bf16 experts kernel serves (sizes multiples of 16)."""
    p = PANEL
    variant = cfg.expert_bias or cfg.swiglu_limit is not None or cfg.expert_input_scaling
    shared = cfg.shared_expert_intermediate_size or 0
    qkv_rows = cfg.q_size * (2 if cfg.attn_output_gate else 1) + 2 * cfg.kv_size
    dense = cfg.dense_intermediate_size if isinstance(cfg.dense_intermediate_size, int) else 0
    return {"attention": cfg.mla is None and qkv_rows % p == 0 and cfg.hidden_size % p == 0,
            "experts": not variant and cpu_moe_fits(cfg),
            "shared": bool(shared) and cfg.hidden_size % p == 0 and (2 * shared) % p == 0,
            "lm_head": not cfg.tie_word_embeddings and cfg.vocab_size % p == 0,
            "dense": dense > 0 and not cfg.moe_shortcut and cfg.hidden_size % p == 0 and (2 * dense) % p == 0}


def bf16_weights_serve(flags: KernelFlags | None, caps: Capabilities | None = None) -> bool:
    """Whether the C kernels can run bf16 weights with float32 math on the CPU (`caps`; None: this
    process's, the kernels loaded if they build), as `flags` allow (what `--dtype auto` asks before
    keeping a bf16 checkpoint's weights in bf16 on the CPU)."""
    flags = flags or KernelFlags()
    if flags.cpu_kernels == "off":
        return False
    caps = caps or Capabilities.detect(torch.device("cpu"), torch.float32, flags.cpu_kernels)
    return (caps.device_type == "cpu" and caps.cpu_kernels is not None and flags.moe in ("auto", "cpu")
            and flags.cpu_linear in ("auto", "packed"))


_PARAM_GROUPS = ((re.compile(r"layers\.\d+\.attn\.(qkv|o_proj)\.weight"), "attention"),
                 (re.compile(r"layers\.\d+\.moe\.(w13|w2)"), "experts"),
                 (re.compile(r"layers\.\d+\.moe\.shared\.(w13|w2)\.weight"), "shared"),
                 (re.compile(r"lm_head\.weight"), "lm_head"),
                 (re.compile(r"layers\.\d+\.mlp\.(w13|w2)\.weight"), "dense"))


def param_group(param: str) -> str | None:
    """The group of `quantizable` a parameter of ours belongs to (None: never quantized)."""
    return next((g for pattern, g in _PARAM_GROUPS if pattern.fullmatch(param)), None)


def quantized_groups(names) -> dict[str, bool]:
    """Which groups the quantized parameters `names` fill (a model's `quantized`)."""
    held = {param_group(n) for n in names}
    return {g: g in held for g in ("attention", "experts", "shared", "lm_head", "dense")}


def _check_quantization(quantization: str, flags: KernelFlags, caps: Capabilities, dtype: torch.dtype) -> None:
    if quantization == BF16_WEIGHTS:
        if not bf16_weights_serve(flags, caps) or dtype != torch.float32:
            raise KernelPlanError(f"bf16 weights with float32 math need the CPU, the C kernels built here, float32 "
                                  f"compute and --moe-backend auto|cpu, --cpu-linear-layout auto|packed (device "
                                  f"{caps.device_type}, C kernels {caps.cpu_kernels or 'not built'}, dtype {dtype}, "
                                  f"flags: {_flags_text(flags)})")
        return
    if not (caps.device_type == "cpu" and caps.cpu_kernels):
        raise KernelPlanError(f"--quantization {quantization}: needs the CPU and the C kernels built here (device "
                              f"{caps.device_type}, C kernels {caps.cpu_kernels or 'not built'})")
    if dtype != torch.float32:
        raise KernelPlanError(f"--quantization {quantization}: the quantized kernels compute in float32 "
                              f"(--dtype float32 or auto), not {dtype}")
    if flags.moe not in ("auto", "cpu"):
        raise KernelPlanError(f"--quantization {quantization}: quantized experts run the C experts kernel "
                              f"(--moe-backend auto or cpu), not {flags.moe}")


ATTN_PARAMS = ("qkv", "o_proj", "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")


def _group_format(formats: dict[str, str], names: list[str]) -> str:
    """The WeightFormat of a group of parameters ("bf16" for float ones; several joined by "+")."""
    found = sorted({str(getattr(formats.get(n), "value", formats.get(n) or "bf16")) for n in names})
    return "+".join(found)


def resolve_plan(cfg: MoEModelConfig, device: torch.device, dtype: torch.dtype, flags: KernelFlags | None = None,
                 caps: Capabilities | None = None, quantization: str | None = None,
                 quantized_groups: Mapping[str, bool] | None = None,
                 weight_formats: dict[str, str] | None = None) -> KernelPlan:
    """The kernels of every layer of a model with config `cfg` on `device` in `dtype`, its
    weights quantized to `quantization` (a format of models/kernels/quant.py) where given.
    `quantized_groups` (default: every group `quantizable` allows): which groups of weights are
    held quantized (a GGUF file's packed tensors: models/gguf_loader.py); `weight_formats`: the
    parameters kept in a checkpoint's quantized format (name -> WeightFormat)."""
    flags = flags or KernelFlags()
    caps = caps or Capabilities.detect(device, dtype, flags.cpu_kernels)
    notes: list[str] = []
    qf = dict(weight_formats or {})
    if qf and caps.device_type == "cuda" and not caps.triton:
        raise KernelPlanError(f"weights kept in {_group_format(qf, list(qf))} run the Triton kernels on CUDA "
                              "(models/kernels/triton_qmoe.py): Triton is not installed")

    def attn_names(i: int) -> list[str]:
        return [f"layers.{i}.attn.{n}.weight" for n in ATTN_PARAMS]

    def held(names: list[str]) -> bool:
        return any(n in qf for n in names)

    def experts_names(i: int) -> list[str]:
        return [f"layers.{i}.moe.w13", f"layers.{i}.moe.w2"] if cfg.sparse_layers[i] else \
            [f"layers.{i}.mlp.w13.weight", f"layers.{i}.mlp.w2.weight"]

    def shared_names(i: int) -> list[str]:
        return [f"layers.{i}.moe.shared.w13.weight", f"layers.{i}.moe.shared.w2.weight"]
    quant = (bf16_groups(cfg) if quantization == BF16_WEIGHTS else quantizable(cfg)) if quantization else {}
    if quantization and quantized_groups is not None:
        quant = {g: on and bool(quantized_groups.get(g)) for g, on in quant.items()}
    if quantization:
        _check_quantization(quantization, flags, caps, dtype)
    # the C ops on the CPU: float32 rows (a bf16-compute model keeps the PyTorch ops)
    c_fused = caps.device_type == "cpu" and caps.cpu_kernels is not None and dtype == torch.float32
    if flags.fused_ops != "auto":
        fused_ops = None if flags.fused_ops == "torch" else flags.fused_ops
    else:
        fused_ops = "triton" if caps.device_type == "cuda" and caps.triton else "cpu" if c_fused else None
    if fused_ops == "triton" and not caps.triton:
        raise KernelPlanError("--fused-ops triton: Triton is not installed")
    if fused_ops == "cpu" and not c_fused:
        raise KernelPlanError("--fused-ops cpu: the C ops serve float32 models on the CPU with the C kernels built "
                              f"(here: {caps.device_type}, {str(dtype).removeprefix('torch.')}, C kernels "
                              f"{'built' if caps.cpu_kernels else 'not built'})")
    fused = fused_ops is not None
    plain_attention = _attention(flags, caps, dtype)
    plain_moe = _moe(flags, caps, dtype, cfg)
    variant = cfg.expert_bias or cfg.swiglu_limit is not None or cfg.expert_input_scaling
    router = _router(caps)

    # packed copies on the CPU (float32): what they would cost, then whether they fit the budget
    pack = (caps.device_type == "cpu" and dtype == torch.float32 and flags.cpu_linear != "plain"
            and (caps.cpu_kernels is not None or caps.onednn))
    elem = torch.empty((), dtype=dtype).element_size()
    H, inter, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    qkv_rows = cfg.q_size * (2 if cfg.attn_output_gate else 1) + 2 * cfg.kv_size
    extra = 0 if quant.get("lm_head") or "lm_head.weight" in qf else cfg.vocab_size * H
    mla_in = mla_projections(cfg)
    shared = cfg.shared_expert_intermediate_size or 0
    for i in range(cfg.num_layers):
        gqa = cfg.mla is None and cfg.layer_kind(i) == "attention"
        if gqa and not quant.get("attention") and not held(attn_names(i)):
            extra += qkv_rows * H + H * cfg.q_size
        if cfg.mla is not None and cfg.layer_kind(i) == "attention" and not held(attn_names(i)):  # MLA's projections
            extra += sum(rows * k for rows, k in mla_in) + H * cfg.num_heads * cfg.mla.v_head_dim
        if cfg.sparse_layers[i] and shared and not quant.get("shared") and not held(shared_names(i)):
            extra += 3 * shared * H  # the shared expert's w13 and w2
        if held(experts_names(i)):
            pass  # kept quantized: no packed copy
        elif cfg.sparse_layers[i] and not variant and not quant.get("experts"):
            # the loop's gate+up copies; the C kernel's copy of gate+up and down besides
            extra += E * 2 * inter * H * (1 if plain_moe == MoEKernel.LOOP else 2) + (
                E * H * inter if plain_moe == MoEKernel.CPU else 0)
        elif cfg.sparse_layers[i] and variant and plain_moe == MoEKernel.CPU:  # variants: the C kernel's copy only
            extra += E * 3 * inter * H
    extra *= elem
    if pack and flags.cpu_linear == "auto" and extra > PACKED_BYTES_AUTO:
        pack = False
        notes.append(f"packed weight copies would take {extra / 2**20:.0f} MiB, over the "
                     f"{PACKED_BYTES_AUTO / 2**20:.0f} MiB budget of --cpu-linear-layout auto: weights stay plain")
        if plain_moe == MoEKernel.CPU and flags.moe == "auto":
            plain_moe = MoEKernel.LOOP
            notes.append("the C experts kernel needs its packed copy: experts run the loop")
    if plain_moe == MoEKernel.CPU and not pack and not quant.get("experts") and not all(
            held(experts_names(i)) for i in range(cfg.num_layers) if cfg.sparse_layers[i]):
        raise KernelPlanError("--moe-backend cpu needs packed expert weights: --cpu-linear-layout packed keeps them "
                              "whatever their size (plain keeps none; auto only within its budget)")

    def layout(out_features: int) -> LinearLayout:
        return _layout(flags, caps, out_features) if pack else LinearLayout.PLAIN

    mla_rows = math.gcd(*(rows for rows, _ in mla_in)) if mla_in else 0  # panels need every one a multiple
    layers = []
    for i in range(cfg.num_layers):
        kind = attention_kind(cfg, i)
        mla = cfg.mla is not None and cfg.layer_kind(i) == "attention"
        gqa = cfg.mla is None and cfg.layer_kind(i) == "attention"
        # the paged decode kernels serve every GQA kind: window, chunk and sinks are kernel arguments
        # (the gate comes after); MLA has its own decode kernels (models/kernels/mla_decode.py), not DSA
        plain = kind.startswith("gqa") or kind == "mla"
        use_rope = cfg.uses_rope(i)
        fused_rope = (fused and kind == "gqa" and use_rope and cfg.rope_style == "neox" and cfg.clip_qkv is None
                      and cfg.qk_norm in (None, "head") and not cfg.qk_norm_after_rope
                      and cfg.rotary_dim in (None, cfg.head_dim))
        moe = moe_large = None
        if cfg.sparse_layers[i]:
            moe = MoEKernel.LOOP if variant and plain_moe not in VARIANT_KERNELS else plain_moe
            # plain experts: the loop above the C kernel's batch sizes (oneDNN's GEMMs there); family
            # variants keep the C kernel at every size (their loop reads the unpacked stacks, bias
            # column included: slower at every size measured, scripts/bench_variant_experts.py and
            # docs/benchmarks.md "Family decode")
            moe_large = MoEKernel.LOOP if moe == MoEKernel.CPU and not variant else None
            if quant.get("experts"):  # only the quantized stacks exist: the C kernel at every batch size
                moe, moe_large = MoEKernel.CPU, None
            if held(experts_names(i)):  # models.quant.ops.qmoe: Triton on CUDA, the torch reference (a loop) on
                # the CPU unless --moe-backend triton asks for the Triton kernels there (TRITON_INTERPRET=1: tests)
                use_triton = caps.device_type == "cuda" or (flags.moe == "triton" and caps.triton)
                moe, moe_large = (MoEKernel.TRITON if use_triton else MoEKernel.LOOP), None
                if not use_triton and fp8_cpu_kernels(caps, flags, [qf[n] for n in experts_names(i) if n in qf]):
                    moe = MoEKernel.CPU  # the C fp8 experts kernel (csrc/fp8_cpu.c), every batch size
        q_attn = gqa and quant.get("attention", False)
        q_shared = cfg.sparse_layers[i] and quant.get("shared", False)
        q_experts = cfg.sparse_layers[i] and (quant.get("experts", False) or held(experts_names(i)))
        proj = (("qkv",) if gqa else ("q_proj",) if mla and cfg.mla.q_lora_rank is None else ("q_a_proj", "q_b_proj")
                if mla else ())
        kept_attn = bool(proj) and all(f"layers.{i}.attn.{n}.weight" in qf for n in proj + (
            () if gqa else ("kv_a_proj",)))
        kept_shared = cfg.sparse_layers[i] and shared and all(n in qf for n in shared_names(i))
        q_dense = not cfg.sparse_layers[i] and quant.get("dense", False) and not held(experts_names(i))
        layers.append(LayerKernels(
            attention_kind=kind, attention=plain_attention if plain else AttentionKernel.REFERENCE,
            fused_rope=fused_rope, fused_norms=fused and cfg.residual_multiplier == 1.0,
            qkv=LinearLayout.QUANTIZED if q_attn or kept_attn else layout(qkv_rows) if gqa else layout(mla_rows) if mla
            else LinearLayout.PLAIN,
            o=LinearLayout.QUANTIZED if q_attn or kept_attn or f"layers.{i}.attn.o_proj.weight" in qf
            else layout(H) if gqa or mla else LinearLayout.PLAIN,
            expert_kind=expert_kind(cfg) if cfg.sparse_layers[i] else None, moe=moe, moe_large=moe_large,
            gate_up=layout(2 * inter) if moe in (MoEKernel.LOOP, MoEKernel.CPU) and not variant and not q_experts
            else LinearLayout.PLAIN,
            router=router if cfg.sparse_layers[i] else "reference",
            shared=LinearLayout.QUANTIZED if q_shared or kept_shared else layout(math.gcd(2 * shared, H))
            if cfg.sparse_layers[i] and shared else LinearLayout.PLAIN,
            quant=quantization if (q_attn or q_shared or q_dense or (q_experts and quantization)) else None,
            attn_format=_group_format(qf, [n for n in attn_names(i) if n in qf] or ["-"])
            if cfg.layer_kind(i) == "attention" else "bf16",
            experts_format=_group_format(qf, experts_names(i)),
            shared_format=_group_format(qf, shared_names(i)) if cfg.sparse_layers[i] and shared else None,
            mlp=LinearLayout.QUANTIZED if q_dense else LinearLayout.PLAIN,
        ))
    # the placement executor packs each CPU device's stack for the C kernel (float32 copies); the
    # CPU expert tier of an accelerator's plan too (its experts in float32; the kernels load then).
    # Its packed stacks carry no biases or limits: placed family variants run the Triton kernel
    # (which takes them through the layer's expert function) or the loop
    placed = plain_moe if not variant or plain_moe in (VARIANT_KERNELS - {MoEKernel.CPU}) else MoEKernel.LOOP
    host_tier = MoEKernel.CPU if not variant and cpu_moe_fits(cfg) and flags.cpu_kernels != "off" else MoEKernel.LOOP
    placed_moe = ((caps.device_type, placed),) + ((("cpu", host_tier),) if caps.device_type != "cpu" else ())
    graphs = caps.device_type == "cuda" and all(lk.sync_free for lk in layers)
    if caps.device_type == "cuda" and not graphs:
        slow = sorted({f"{lk.attention_kind}: {lk.attention.value}" for lk in layers
                       if lk.attention not in SYNC_FREE}
                      | {f"experts: {lk.moe.value}" for lk in layers if lk.moe is not None and lk.moe not in SYNC_FREE})
        notes.append(f"CUDA graphs off: kernels that read back to the host ({', '.join(slow)})")
    lm_head = LinearLayout.QUANTIZED if quant.get("lm_head") or "lm_head.weight" in qf else layout(cfg.vocab_size)
    notes += fp8_cpu_notes(caps, flags, qf)
    return KernelPlan(
        device=str(device), dtype=str(dtype).removeprefix("torch."), flags=flags, capabilities=caps,
        layers=tuple(layers), lm_head=lm_head, placed_moe=placed_moe,
        packed_bytes=extra if pack else 0, cuda_graphs=graphs, notes=tuple(notes), quantization=quantization,
        quantized_bytes=quantized_bytes(cfg, quantization, tuple(layers), lm_head) if quantization else 0,
        lm_head_format=_group_format(qf, ["lm_head.weight"]), fused_ops=fused_ops)


FP8_FORMATS = frozenset({"fp8_block", "fp8_channel", "fp8_tensor"})


def fp8_cpu_kernels(caps: Capabilities, flags: KernelFlags, formats) -> bool:
    """Whether weights kept in `formats` (WeightFormats) run the C fp8 kernels (csrc/fp8_cpu.c): all
    fp8, on the CPU, with the C kernels built here and --moe-backend auto or cpu (for experts)."""
    names = [str(getattr(f, "value", f)) for f in formats]
    return (caps.device_type == "cpu" and caps.cpu_kernels is not None and flags.moe in ("auto", "cpu")
            and bool(names) and all(n in FP8_FORMATS for n in names))


def fp8_linears_on_cpu(caps: Capabilities) -> bool:
    """Whether linears kept in an fp8 format run the C fp8 kernel (the CPU with the C kernels built)."""
    return caps.device_type == "cpu" and caps.cpu_kernels is not None


def fp8_cpu_notes(caps: Capabilities, flags: KernelFlags, qf: Mapping[str, str]) -> list[str]:
    """The plan's line on which path computes the fp8 weights on the CPU."""
    fp8 = sorted({str(getattr(f, "value", f)) for f in qf.values()} & FP8_FORMATS)
    if caps.device_type != "cpu" or not fp8:
        return []
    if fp8_linears_on_cpu(caps):
        experts = "experts and linears" if flags.moe in ("auto", "cpu") else "linears (experts: the torch reference)"
        return [f"{'+'.join(fp8)} weights: the C fp8 kernels ({experts}; csrc/fp8_cpu.c, the e4m3 bytes converted "
                "in registers, float32 math)"]
    return [f"{'+'.join(fp8)} weights: the torch reference (dequantized per call; the C kernels are not built here)"]


def quantized_bytes(cfg: MoEModelConfig, fmt: str, layers: tuple[LayerKernels, ...], lm_head: LinearLayout) -> int:
    """The bytes of the weights a plan keeps quantized in `fmt` (values and scales)."""
    from models.kernels.quant import bytes_per_weight

    H, inter, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    qkv_rows = cfg.q_size * (2 if cfg.attn_output_gate else 1) + 2 * cfg.kv_size
    shared = cfg.shared_expert_intermediate_size or 0

    def b(rows: int, k: int) -> int:
        return round(rows * k * bytes_per_weight(fmt, k))

    total = b(cfg.vocab_size, H) if lm_head == LinearLayout.QUANTIZED else 0
    for lk in layers:
        if lk.qkv == LinearLayout.QUANTIZED:
            total += b(qkv_rows, H) + b(H, cfg.q_size)
        if lk.quant and lk.moe == MoEKernel.CPU and lk.moe_large is None:
            total += E * (b(2 * inter, H) + b(H, inter))
        if lk.shared == LinearLayout.QUANTIZED:
            total += b(2 * shared, H) + b(H, shared)
        if lk.mlp == LinearLayout.QUANTIZED:
            total += b(2 * cfg.dense_intermediate_size, H) + b(H, cfg.dense_intermediate_size)
    return total
