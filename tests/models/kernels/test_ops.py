"""The kernels as registered operators (`torch.ops.moe_serve.*`): every op passes
`torch.library.opcheck` (schema, fake implementation, dispatch under dynamic shapes), the C
kernels show by name in `torch.profiler` on an engine's CPU decode step, and a model using them
compiles with `torch.compile(fullgraph=True)` to the same logits."""

from __future__ import annotations

import pytest
import torch

from models.kernels import cpu_ops
from models.kernels.packed import PackedExperts, PackedWeight, moe_cpu, packed_linear
from models.kernels.plan import LinearLayout
from tests.conftest import skip_or_fail
from tests.models.kernels.conftest import rel_err


@pytest.fixture(scope="module")
def ops():
    if cpu_ops.load() is None:
        skip_or_fail("the CPU kernels are not built here (no C compiler or no AVX2 + FMA)")
    return torch.ops.moe_serve


def cpu_cases():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 16, generator=g)
    k, v = torch.randn(10, 4, 2, 16, generator=g), torch.randn(10, 4, 2, 16, generator=g)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    lens = torch.tensor([9, 1, 12])
    x = torch.randn(5, 32, generator=g)
    w13, w2 = torch.randn(4, 64, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    ids = torch.randint(0, 4, (5, 2), generator=g)
    w = torch.rand(5, 2, generator=g)
    lin = torch.randn(48, 32, generator=g)
    p13, p2 = torch.ops.moe_serve.moe_pack_cpu(w13, w2)
    return {
        "paged_decode_cpu": (q, k, v, tables, lens, 0.25),
        "moe_experts_cpu": (x, ids, w, p13, p2),
        "moe_pack_cpu": (w13, w2),
        "linear_cpu": (x, torch.ops.moe_serve.linear_pack_cpu(lin), torch.randn(48, generator=g)),
        "linear_pack_cpu": (lin,),
        "moe_experts_variant_cpu": (x, ids, w, p13, p2, torch.randn(4, 64, generator=g), torch.randn(4, 32, generator=g),
                                    7.0, 1.702, True),
        "moe_route_cpu": (torch.randn(5, 8, generator=g), torch.randn(8, generator=g), 2, "sigmoid", True, 0.0, 4, 2,
                          "top2_sum", 2.5),
    }


@pytest.mark.parametrize("name", ["paged_decode_cpu", "moe_experts_cpu", "moe_pack_cpu", "linear_cpu",
                                  "linear_pack_cpu", "moe_experts_variant_cpu", "moe_route_cpu"])
def test_opcheck_cpu_ops(ops, name):
    torch.library.opcheck(getattr(ops, name).default, cpu_cases()[name])


def test_cpu_kernels_info_reports_the_build(ops):
    avx2, openmp = ops.cpu_kernels_info()
    assert avx2 == 1 and openmp in (0, 1)
    assert cpu_ops.load() == ("openmp" if openmp else "pthreads")


def test_ops_check_their_arguments(ops):
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="float32"):
        ops.linear_pack_cpu(torch.randn(32, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be \\[M, K\\]"):
        ops.linear_cpu(x, ops.linear_pack_cpu(torch.randn(32, 16)), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        k = torch.randn(4, 4, 2, 16).transpose(0, 1)
        ops.paged_decode_cpu(torch.randn(1, 4, 16), k, k, torch.zeros(1, 1, dtype=torch.long), torch.ones(1), 1.0)


def triton_cases():
    g = torch.Generator().manual_seed(1)
    T, H, I, E, k = 5, 32, 16, 4, 2
    x = torch.randn(T, H, generator=g)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)
    q = torch.randn(3, 4, 16, generator=g)
    kc, vc = torch.randn(10, 4, 2, 16, generator=g), torch.randn(10, 4, 2, 16, generator=g)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    lens = torch.tensor([9, 1, 12], dtype=torch.int32)
    qkv = torch.randn(T, (4 + 2 * 2) * 16, generator=g)
    cos, sin = torch.randn(T, 1, 16, generator=g), torch.randn(T, 1, 16, generator=g)
    kv = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    return {
        "fused_moe_triton": (x, w13, w2, ids, w),
        "paged_decode_triton": (q, kc, vc, tables, lens, 0.25),
        "rmsnorm_triton": (x, torch.ones(H), 1e-6),
        "add_rmsnorm_triton": (x, torch.randn(T, H, generator=g), torch.ones(H), 1e-6),
        "rope_write_kv_triton": (qkv, cos, sin, *kv, torch.tensor([0, 3, 5, 9, 14]), 4, 2, 16, None, None, 1e-6),
        "route_triton": (torch.randn(T, 8, generator=g), torch.randn(8, generator=g), 2, "sigmoid", True, 0.0, 4, 2,
                         "top2_sum", 2.5),
    }


@pytest.mark.parametrize("name", ["fused_moe_triton", "paged_decode_triton", "rmsnorm_triton", "add_rmsnorm_triton",
                                  "rope_write_kv_triton", "route_triton"])
def test_opcheck_triton_ops(name):
    """Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), compiled on a GPU."""
    from models.kernels import triton_attention, triton_moe, triton_ops, triton_router  # noqa: F401 - register the ops

    torch.library.opcheck(getattr(torch.ops.moe_serve, name).default, triton_cases()[name],
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_profiler_names_the_c_kernels_of_a_decode_step(ops, tiny_mixtral):
    """An engine's CPU decode step under torch.profiler: the C kernels are there by name (they
    used to be ctypes calls, invisible to it)."""
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    llm = LLM(tiny_mixtral, dtype="float32", max_num_seqs=4)
    core = llm.core
    for i in range(3):
        core.add_request(EngineRequest(f"r{i}", [5 + i, 9, 23, 7], SamplingParams(temperature=0.0, max_tokens=8,
                                                                                    ignore_eos=True)))
    core.step()  # the prefills
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        core.step()  # one decode step
    names = {e.name for e in prof.events()}
    for op in ("moe_serve::paged_decode_cpu", "moe_serve::moe_experts_cpu", "moe_serve::linear_cpu"):
        assert op in names, sorted(n for n in names if "::" in n)[:40]


def test_a_model_compiles_fullgraph_with_the_c_kernels(ops, family_checkpoint):
    """A tiny Mixtral's decode forward and LM head, every kernel a registered op, compiled with
    torch.compile(fullgraph=True) on the CPU: no graph break, the same logits as eager."""
    from models import load_model
    from models.kernels.plan import AttentionKernel, MoEKernel
    from models.layers.paged import AttentionMetadata

    path, _ = family_checkpoint("mixtral")
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    assert {lk.attention for lk in model.kernel_plan.layers} == {AttentionKernel.CPU}
    assert {lk.moe for lk in model.kernel_plan.layers} == {MoEKernel.CPU}
    B, bs = 3, 4
    caches = model.allocate_kv_cache(16, bs)
    g = torch.Generator().manual_seed(0)
    for k, v in caches:  # a context already in the cache
        k.normal_(generator=g)
        v.normal_(generator=g)
    ids = torch.tensor([5, 17, 40])
    positions = torch.tensor([6, 2, 9])
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])

    def decode(ids, positions, slots, tables, lens):
        meta = AttentionMetadata(num_decodes=B, query_start_loc=list(range(B + 1)), seq_lens=[1] * B,
                                 slot_mapping=slots, block_tables=tables, decode_seq_lens=lens)
        return model.compute_logits(model(ids, positions, meta, caches))

    args = (ids, positions, tables[:, 0] * bs + positions % bs, tables, positions + 1)
    with torch.inference_mode():  # as the engine runs the model
        eager = decode(*args)  # also makes the packed copies the compiled graph reads
        torch._dynamo.reset()
        compiled = torch.compile(decode, fullgraph=True, backend="inductor")
        assert rel_err(compiled(*args), eager) < 1e-6


def test_packed_helpers_call_the_ops(ops):
    w = torch.randn(32, 16)
    x = torch.randn(3, 16)
    assert rel_err(packed_linear(x, PackedWeight(w, LinearLayout.PANELS)), x @ w.T) < 1e-6
    w13, w2 = torch.randn(2, 32, 16), torch.randn(2, 16, 16)
    ids, wt = torch.tensor([[0, 1]]), torch.tensor([[0.25, 0.75]])
    out = moe_cpu(torch.randn(1, 16), PackedExperts(w13, w2), ids, wt)
    assert out.shape == (1, 16)
