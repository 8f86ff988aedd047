"""FP8 weights through the engine on the CPU: a tiny DeepSeek-V3 FP8 checkpoint (128x128-style
blocks, here 16x16: MLA projections, experts, shared experts) and `--quantization fp8` on the
bundled model run the C fp8 kernels (csrc/fp8_cpu.c; the plan says so, the profiler sees the ops),
to the logits of the torch reference path (`--cpu-kernels off`: models.quant.ops dequantizing per
call) within 1e-4 relative, with the same greedy continuations."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from models import load_model
from models.kernels.flags import KernelFlags
from models.kernels.plan import MoEKernel
from tests.conftest import BUNDLED
from tests.models.conftest import make_checkpoint
from tests.models.kernels.test_quant import needs_kernels
from tests.models.simple_runner import greedy_generate, prefill_logits
from tests.models.test_parity import PROMPTS
from tests.models.test_quant import fp8_tiles, rewrite

FP8_OPS = {"moe_serve::fp8_linear_cpu", "moe_serve::fp8_moe_cpu"}


def ops_run(fn) -> tuple[object, set[str]]:
    """fn()'s result and the fp8 ops it ran (torch.profiler's operator events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()} & FP8_OPS


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a_, b_ = torch.cat(a).double(), torch.cat(b).double()
    return ((a_ - b_).norm() / b_.norm()).item()


def assert_c_path(model) -> None:
    plan = model.kernel_plan
    sparse = [lk for lk in plan.layers if lk.moe is not None]
    assert sparse and all(lk.moe == MoEKernel.CPU for lk in sparse), plan.table()
    assert any("the C fp8 kernels (experts and linears" in n for n in plan.notes), plan.table()


def test_fp8_checkpoint_runs_the_c_kernels(tmp_path):
    needs_kernels()
    make_checkpoint("deepseek_v3", tmp_path, seed=5)

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 16, 16)
        return {name: q, name + "_scale_inv": scale}, deq

    rewrite(tmp_path, quantize, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [16, 16]})
    model = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    ref = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False,
                     kernels=KernelFlags(cpu_kernels="off"))
    assert set(model.weight_formats().values()) == {"fp8_block"}
    assert_c_path(model)
    assert all(lk.moe == MoEKernel.LOOP for lk in ref.kernel_plan.layers if lk.moe is not None)
    assert any("the torch reference" in n for n in ref.kernel_plan.notes), ref.kernel_plan.table()
    ours, ran = ops_run(lambda: prefill_logits(model, PROMPTS))
    assert ran == FP8_OPS
    theirs, ran_ref = ops_run(lambda: prefill_logits(ref, PROMPTS))
    assert not ran_ref
    assert relative(ours, theirs) <= 1e-4
    prompts = PROMPTS[1:3]
    assert greedy_generate(model, prompts, 4) == greedy_generate(ref, prompts, 4)


def test_quantization_fp8_on_the_bundled_model_runs_the_c_kernels():
    """`--quantization fp8` (per channel at load) on the bundled model: the C path, the reference
    path's logits (the same model re-planned with the C kernels off), greedy tokens batch invariant."""
    needs_kernels()
    model = load_model(str(BUNDLED), progress=False, quantization="fp8")
    assert set(model.weight_formats().values()) == {"fp8_channel"}
    assert_c_path(model)
    prompts = [[0, 450, 1601, 1153, 906], [0, 5], [0, 77, 78, 79, 80, 81, 82]]
    ours, ran = ops_run(lambda: prefill_logits(model, prompts))
    assert ran == FP8_OPS
    greedy = greedy_generate(model, prompts, 5)
    assert greedy == [greedy_generate(model, [p], 5)[0] for p in prompts]
    model.plan_kernels(KernelFlags(cpu_kernels="off"))
    theirs, ran = ops_run(lambda: prefill_logits(model, prompts))
    assert not ran
    assert relative(ours, theirs) <= 1e-4
