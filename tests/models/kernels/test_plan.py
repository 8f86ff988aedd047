"""The kernel plan (models/kernels/plan.py): the rules per device, dtype, layer kind and flag, on
the tiny configs of every family, with the machine's capabilities given explicitly (so the CUDA
rules are tested without a GPU); the engine's CUDA-graph decision; refusals of forced choices
that cannot serve; and that nothing outside the plan probes what the machine can run."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from models.hf_config import from_hf_config
from models.kernels.flags import KernelFlags
from models.kernels.plan import (
    CPU_KERNEL_PAIRS_PER_EXPERT,
    PACKED_BYTES_AUTO,
    AttentionKernel,
    Capabilities,
    KernelPlanError,
    LinearLayout,
    MoEKernel,
    resolve_plan,
)
from models.registry import TINY_CONFIGS, family_for
from tests.models.conftest import TINY

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
CPU_CAPS = Capabilities("cpu", triton=True, cpu_kernels="openmp", onednn=True)
BARE_CPU = Capabilities("cpu", triton=False, cpu_kernels=None, onednn=False)
H100 = Capabilities("cuda", triton=True, grouped_mm=True)
REPO = Path(__file__).resolve().parents[3]


def config(name: str):
    tiny = TINY_CONFIGS[name]
    hf = family_for(tiny.architecture).hf_config_class(tiny.architecture)(**{**TINY, **tiny.fields})
    return from_hf_config(hf, tiny.architecture)


def test_cpu_float32_gets_the_c_kernels_and_packed_copies():
    cfg = config("mixtral")
    plan = resolve_plan(cfg, CPU, torch.float32, caps=CPU_CAPS)
    assert {lk.attention for lk in plan.layers} == {AttentionKernel.CPU}
    assert {(lk.moe, lk.moe_large) for lk in plan.layers} == {(MoEKernel.CPU, MoEKernel.LOOP)}
    assert {(lk.qkv, lk.o, lk.gate_up) for lk in plan.layers} == {(LinearLayout.PANELS,) * 3}
    assert plan.lm_head == LinearLayout.PANELS and plan.packed_bytes > 0
    assert not plan.cuda_graphs
    # RMSNorm and rotary + KV store: the C ops (float32 on the CPU)
    assert plan.fused_ops == "cpu" and all(lk.fused_rope and lk.fused_norms for lk in plan.layers)
    assert plan.placed_moe == (("cpu", MoEKernel.CPU),)  # the executor packs each device's stack
    table = plan.table()
    assert "| C / C |" in table and "gqa: cpu" in table and f"up to {CPU_KERNEL_PAIRS_PER_EXPERT} pairs/expert, loop above" in table
    as_dict = plan.to_dict()
    assert as_dict["layers"][0]["layers"] == [0, cfg.num_layers - 1] and as_dict["layers"][0]["moe"] == "cpu"


def test_without_c_kernels_or_in_bf16_the_pytorch_paths_serve():
    cfg = config("mixtral")
    bare = resolve_plan(cfg, CPU, torch.float32, caps=BARE_CPU)
    assert {(lk.attention, lk.moe, lk.qkv) for lk in bare.layers} == {
        (AttentionKernel.REFERENCE, MoEKernel.LOOP, LinearLayout.PLAIN)}
    assert not any(lk.fused_rope or lk.fused_norms for lk in bare.layers)
    bf16 = resolve_plan(cfg, CPU, torch.bfloat16, caps=CPU_CAPS)
    assert not any(lk.fused_rope or lk.fused_norms for lk in bf16.layers)  # the C ops are float32
    torch_ops = resolve_plan(cfg, CPU, torch.float32, KernelFlags(fused_ops="torch"), caps=CPU_CAPS)
    assert not any(lk.fused_rope or lk.fused_norms for lk in torch_ops.layers)
    assert {(lk.attention, lk.moe, lk.qkv) for lk in bf16.layers} == {
        (AttentionKernel.REFERENCE, MoEKernel.LOOP, LinearLayout.PLAIN)}
    assert bf16.packed_bytes == 0 and bf16.lm_head == LinearLayout.PLAIN


def test_panel_width_decides_layouts_and_the_experts_kernel():
    cfg = dataclasses.replace(config("mixtral"), moe_intermediate_size=40)  # not a multiple of 16
    plan = resolve_plan(cfg, CPU, torch.float32, caps=CPU_CAPS)
    assert {lk.moe for lk in plan.layers} == {MoEKernel.LOOP}
    assert {lk.gate_up for lk in plan.layers} == {LinearLayout.PANELS}  # 2I = 80 rows: whole panels
    cfg = dataclasses.replace(config("mixtral"), vocab_size=330)
    assert resolve_plan(cfg, CPU, torch.float32, caps=CPU_CAPS).lm_head == LinearLayout.ONEDNN
    with pytest.raises(KernelPlanError, match="multiples of 16"):
        resolve_plan(dataclasses.replace(cfg, moe_intermediate_size=40), CPU, torch.float32,
                     KernelFlags(moe="cpu"), caps=CPU_CAPS)


def test_over_the_packing_budget_weights_stay_plain_and_experts_run_the_loop():
    cfg = dataclasses.replace(config("mixtral"), vocab_size=PACKED_BYTES_AUTO // (4 * 64) + 16)
    plan = resolve_plan(cfg, CPU, torch.float32, caps=CPU_CAPS)
    assert {(lk.moe, lk.qkv) for lk in plan.layers} == {(MoEKernel.LOOP, LinearLayout.PLAIN)}
    assert plan.packed_bytes == 0 and any("budget" in n for n in plan.notes)
    forced = resolve_plan(cfg, CPU, torch.float32, KernelFlags(cpu_linear="packed"), caps=CPU_CAPS)
    assert {lk.moe for lk in forced.layers} == {MoEKernel.CPU} and forced.packed_bytes > PACKED_BYTES_AUTO
    with pytest.raises(KernelPlanError, match="packed expert weights"):
        resolve_plan(cfg, CPU, torch.float32, KernelFlags(moe="cpu"), caps=CPU_CAPS)


@pytest.mark.parametrize("name, attention, experts", [
    ("gpt_oss", {"gqa+window+sinks", "gqa+sinks"}, "biased clamped swiglu"),
    ("llama4", {"gqa+chunked", "gqa"}, "input-scaled swiglu"),
    ("deepseek_v3", {"mla"}, "swiglu"),
    ("granitemoehybrid", {"mamba2", "gqa"}, "swiglu"),  # Mamba2 layers: their PyTorch scan
])
def test_layer_kinds_the_kernels_lack_take_their_pytorch_paths(name, attention, experts):
    cfg = config(name)
    plan = resolve_plan(cfg, CPU, torch.float32, caps=CPU_CAPS)
    assert {lk.attention_kind for lk in plan.layers} == attention
    for lk in plan.layers:
        # GQA layers with a variant (window, chunk, sinks) take the decode kernels too; MLA its own
        assert lk.attention == (AttentionKernel.CPU if lk.attention_kind.startswith("gqa") or lk.attention_kind == "mla"
                                else AttentionKernel.REFERENCE)
        if lk.moe is not None:  # every expert kind runs the C kernel, the router the C op; plain
            # SwiGLU experts the loop above the C kernel's batch sizes, family variants the C kernel at all
            assert lk.expert_kind == experts
            large = MoEKernel.LOOP if experts == "swiglu" else None
            assert (lk.moe, lk.moe_large, lk.router) == (MoEKernel.CPU, large, "cpu")
    if name == "granitemoehybrid":  # no q/k/v packing for Mamba2 layers; no CUDA graphs (the scan syncs)
        assert {lk.qkv for lk, kind in zip(plan.layers, cfg.layer_kinds) if kind == "mamba"} == {LinearLayout.PLAIN}
        assert not resolve_plan(cfg, CUDA, torch.bfloat16, caps=H100).cuda_graphs
    if name == "deepseek_v3":
        assert {lk.expert_kind for lk in plan.layers} == {None, "swiglu"}  # a dense first layer
        # MLA's projections packed (the tiny q_a's 24 rows are no multiple of the panel: oneDNN), the
        # shared expert too, all counted in the packed bytes; none without packing
        assert {(lk.qkv, lk.o) for lk in plan.layers} == {(LinearLayout.ONEDNN, LinearLayout.PANELS)}
        assert {lk.shared for lk in plan.layers if lk.moe} == {LinearLayout.PANELS}
        assert "shared expert: panels" in plan.table()
        plain = resolve_plan(cfg, CPU, torch.float32, KernelFlags(cpu_linear="plain", moe="loop"), caps=CPU_CAPS)
        assert {(lk.qkv, lk.o, lk.shared) for lk in plain.layers} == {(LinearLayout.PLAIN,) * 3}
        m, H, S = cfg.mla, cfg.hidden_size, cfg.shared_expert_intermediate_size
        mla = (m.q_lora_rank * H + cfg.num_heads * m.qk_head_dim * m.q_lora_rank
               + (m.kv_lora_rank + m.qk_rope_head_dim) * H + H * cfg.num_heads * m.v_head_dim)
        E, inter = cfg.num_experts, cfg.moe_intermediate_size
        others = cfg.vocab_size * H + sum(cfg.sparse_layers) * (E * 2 * inter * H * 2 + E * H * inter)  # head, experts
        assert plan.packed_bytes == 4 * (others + cfg.num_layers * mla + sum(cfg.sparse_layers) * 3 * S * H)


def test_cuda_plan_fuses_and_captures_graphs_unless_the_engine_cannot():
    cfg = config("qwen3_moe")
    plan = resolve_plan(cfg, CUDA, torch.bfloat16, caps=H100)
    assert {(lk.attention, lk.moe, lk.fused_rope, lk.fused_norms) for lk in plan.layers if lk.moe} == {
        (AttentionKernel.TRITON, MoEKernel.TRITON, True, True)}
    assert plan.cuda_graphs and plan.packed_bytes == 0
    assert plan.placed_moe == (("cuda", MoEKernel.TRITON), ("cpu", MoEKernel.CPU))  # the CPU tier: C kernel
    assert plan.for_engine() is plan
    placed = plan.for_engine(placed=True)  # the executor's decode dispatch is sync-free: graphs stay on
    assert placed.cuda_graphs and placed.experts_placed and not any("CUDA graphs off" in n for n in placed.notes)
    # the CPU tier: piecewise graphs cut at its calls (the plan says so); several GPUs: eager unless asked
    for kwargs, cut in (({"host_tier": True}, "CPU expert tier"), ({"placed": True, "host_tier": True}, "CPU expert"),
                        ({"several_gpus": True, "graphs_across_gpus": True}, "other GPUs")):
        tier = plan.for_engine(**kwargs)
        assert tier.cuda_graphs and tier.experts_placed and not any("CUDA graphs off" in n for n in tier.notes)
        assert any(n.startswith("CUDA graphs piecewise") and cut in n for n in tier.notes)
        assert tier.for_engine(**kwargs) is tier  # idempotent: the note is not added twice
    for kwargs, why in (({"placed": True, "several_gpus": True}, "several GPUs"),
                        ({"host_tier": True, "several_gpus": True}, "several GPUs"),
                        ({"capacity_limited": True}, "capacity"),
                        ({"enforce_eager": True}, "--enforce-eager")):
        engine = plan.for_engine(**kwargs)
        assert not engine.cuda_graphs and any(why in n for n in engine.notes)
    without_triton = resolve_plan(cfg, CUDA, torch.bfloat16, caps=dataclasses.replace(H100, triton=False))
    assert {lk.moe for lk in without_triton.layers if lk.moe} == {MoEKernel.GROUPED_MM}
    assert not without_triton.cuda_graphs  # the reference attention reads lengths back
    variants = resolve_plan(config("gpt_oss"), CUDA, torch.bfloat16, caps=H100)
    # window and sink attention layers take the Triton decode kernel, the expert variants the Triton
    # MoE kernel: gpt-oss's decode steps are sync-free, CUDA graphs on
    assert variants.cuda_graphs and not any("read back to the host" in n for n in variants.notes)
    # the expert variants run the Triton kernel (placed experts too), the router one Triton launch;
    # torch._grouped_mm has no variants: the loop
    assert {(lk.moe, lk.router) for lk in variants.layers} == {(MoEKernel.TRITON, "triton")}
    assert not any("experts" in n for n in variants.notes)
    assert variants.placed_moe == (("cuda", MoEKernel.TRITON), ("cpu", MoEKernel.LOOP))
    grouped = resolve_plan(config("gpt_oss"), CUDA, torch.bfloat16, caps=dataclasses.replace(H100, triton=False))
    assert {(lk.moe, lk.router) for lk in grouped.layers} == {(MoEKernel.LOOP, "reference")}
    # partial rotary and q/k norms over the whole projection: the fused rotary does not serve them
    assert not any(lk.fused_rope for lk in resolve_plan(config("minimax_m2"), CUDA, torch.bfloat16,
                                                        caps=H100).layers)


@pytest.mark.parametrize("flags, caps, dtype, match", [
    (KernelFlags(attention="triton"), BARE_CPU, torch.float32, "Triton is not installed"),
    (KernelFlags(attention="cpu"), CPU_CAPS, torch.bfloat16, "needs float32 on the CPU"),
    (KernelFlags(moe="cpu"), BARE_CPU, torch.float32, "C kernels built here"),
    (KernelFlags(moe="grouped_mm"), CPU_CAPS, torch.float32, "compute capability 9.0"),
    (KernelFlags(fused_ops="triton"), BARE_CPU, torch.float32, "Triton is not installed"),
    (KernelFlags(fused_ops="cpu"), BARE_CPU, torch.float32, "C kernels not built"),
    (KernelFlags(fused_ops="cpu"), CPU_CAPS, torch.bfloat16, "serve float32 models"),
])
def test_forced_choices_that_cannot_serve_are_refused_saying_why(flags, caps, dtype, match):
    with pytest.raises(KernelPlanError, match=match):
        resolve_plan(config("mixtral"), CPU, dtype, flags, caps=caps)


def test_flags_validate_their_choices():
    with pytest.raises(ValueError, match="moe kernel choice must be one of"):
        KernelFlags(moe="fast")


def test_a_model_runs_only_with_a_plan_and_a_plan_fits_its_model(family_checkpoint):
    from models import load_model
    from models.model import MoEForCausalLM

    model = MoEForCausalLM(config("mixtral"))
    with pytest.raises(RuntimeError, match="no kernel plan"):
        model.compute_logits(torch.zeros(1, 64))
    other = resolve_plan(config("llama4"), CPU, torch.float32, caps=CPU_CAPS)
    path, _ = family_checkpoint("mixtral")
    with pytest.raises(ValueError, match="layers"):
        load_model(path, dtype="float32", device="cpu", progress=False).apply_plan(other)


PROBES = re.compile(r"\b(triton_available|onednn_available|cpu_ops\.load|get_device_capability|Capabilities\.detect)\(")


def test_only_the_plan_probes_what_the_machine_can_run():
    """Kernel choice lives in models/kernels/plan.py: no other module of the engine asks whether
    Triton, oneDNN, the C kernels or a GPU generation are there (a grep, as the issue asked)."""
    found = []
    for root in ("models", "server"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "models/kernels/plan.py":
                continue
            found += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if PROBES.search(line)]
    assert not found, found
