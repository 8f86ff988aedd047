"""MLA layers with the plan's decode kernel (the C one; Triton's: tests/models/kernels) against
their PyTorch path ("reference"): the same logits within float32 tolerance and the same greedy
tokens, over steps that mix decodes, fresh prefills and chunked-prefill continuations, both the
short ones run as decode-kernel rows and the long ones expanded over one indexed read of the
cache; and through the engine (prefix-cache hits, preemption, chunking, the padded decode path
of CUDA graphs) the same tokens."""

from __future__ import annotations

import pytest
import torch

from models import load_model
from models.kernels.flags import KernelFlags
from models.kernels.plan import AttentionKernel, Capabilities, resolve_plan
from tests.models.simple_runner import SimpleRunner

# q_lora + YaRN (DeepSeek-V3, Kimi K2); DeepSeek-V2 (no q_lora) and Kimi Linear's NoPE MLA run
# the kernels in tests/engine/test_families.py and tests/models/test_parity.py (against transformers)
FAMILIES = ("deepseek_v3",)
FRESH = 12  # the short continuation's first chunk; it continues with SHORT tokens (decode-kernel rows)
SHORT, LONG = 5, 40  # the long one continues a first chunk of 8 with LONG tokens (expanded)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


@torch.inference_mode()
def schedule(model, flags: KernelFlags) -> list[torch.Tensor]:
    """Logits of every token of three steps: prefills; decodes beside a short and a long
    continuation; decodes of all four sequences (greedy)."""
    model.plan_kernels(flags)
    runner = SimpleRunner(model, max_len=80, batch=4, block_size=4)
    p = [tokens(20, 0), tokens(9, 1), tokens(FRESH + SHORT, 2), tokens(8 + LONG, 3)]
    out = [model.compute_logits(runner.step([0, 1, 2, 3], [p[0], p[1], p[2][:FRESH], p[3][:8]], [0, 0, 0, 0]))]
    nxt = [int(out[0][19].argmax()), int(out[0][28].argmax())]
    out.append(model.compute_logits(runner.step([0, 1, 2, 3], [[nxt[0]], [nxt[1]], p[2][FRESH:], p[3][8:]],
                                                [20, 9, FRESH, 8])))
    last = out[1][[0, 1, 1 + SHORT, 1 + SHORT + LONG]].argmax(-1).tolist()
    out.append(model.compute_logits(runner.step([0, 1, 2, 3], [[t] for t in last], [21, 10, FRESH + SHORT, 8 + LONG])))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_mla_kernels_match_the_reference_path(family, family_checkpoint):
    path, _ = family_checkpoint(family)
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    mla = [layer.attn for layer in model.layers if type(layer.attn).__name__ == "MLAttention"]
    assert mla and all(SHORT < a.absorb_max_queries <= LONG for a in mla), "both continuation paths must run"
    ref = schedule(model, KernelFlags(attention="reference"))
    assert all(a._kernel is None for a in mla)
    for kernel in (AttentionKernel.CPU,):  # Triton's interpreter is too slow here: test_mla_decode.py
        got = schedule(model, KernelFlags(attention=kernel.value))
        assert all(a._kernel == kernel for a in mla), kernel
        for step, (g, r) in enumerate(zip(got, ref)):
            assert g.shape == r.shape
            err = ((g - r).abs().max() / r.abs().max()).item()
            assert err < 2e-5, f"{family} {kernel.value} step {step}: {err}"
            assert torch.equal(g.argmax(-1), r.argmax(-1)), f"{family} {kernel.value} step {step}"


def test_packed_mla_projections_and_shared_expert_match_plain_weights(tmp_path):
    """The plan's packed copies of MLA's projections (q_a, q_b, kv_a, o) and of the shared expert,
    in the C kernel's panels (every size here a multiple of 16) and in oneDNN's layout, give the
    logits of the plain weights (F.linear)."""
    from tests.models.conftest import make_checkpoint

    make_checkpoint("deepseek_v3", tmp_path, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16)
    model = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    ref = schedule(model, KernelFlags(cpu_linear="plain", moe="loop"))
    mla = [layer.attn for layer in model.layers]
    shared = [layer.moe.shared for layer in model.layers if layer.is_moe]
    assert shared and all(not a.packed for a in mla) and all(s.packed is None for s in shared)
    for layout in ("panels", "onednn"):
        got = schedule(model, KernelFlags(cpu_linear=layout, moe="loop"))
        plan = model.kernel_plan
        assert {(lk.qkv.value, lk.o.value) for lk in plan.layers} == {(layout, layout)}
        assert {lk.shared.value for lk in plan.layers if lk.moe} == {layout}
        assert all(set(a.packed) == {"q_a_proj", "q_b_proj", "kv_a_proj", "o_proj"} for a in mla)
        assert all(s.packed is not None and {w.layout.value for w in s.packed} == {layout} for s in shared)
        # the forward read them (a copy is made on first use)
        assert all(w._packed is not None for a in mla for w in a.packed.values())
        assert all(w._packed is not None for s in shared for w in s.packed)
        for step, (g, r) in enumerate(zip(got, ref)):
            err = ((g - r).abs().max() / r.abs().max()).item()
            assert err < 2e-5, f"{layout} step {step}: {err}"
            assert torch.equal(g.argmax(-1), r.argmax(-1)), f"{layout} step {step}"


def test_plan_gives_mla_the_kernels_but_not_dsa(family_checkpoint):
    for family, want in (("deepseek_v3", AttentionKernel.CPU), ("deepseek_v32", AttentionKernel.REFERENCE)):
        path, _ = family_checkpoint(family)
        model = load_model(path, dtype="float32", device="cpu", progress=False)
        plan = model.kernel_plan
        assert {lk.attention for lk in plan.layers} == {want}, family
        cuda = resolve_plan(model.config, torch.device("cuda"), torch.bfloat16, caps=Capabilities("cuda", triton=True))
        assert {lk.attention for lk in cuda.layers} == {
            AttentionKernel.TRITON if want == AttentionKernel.CPU else AttentionKernel.REFERENCE}
        # decode steps sync-free where the experts are too: CUDA graphs for DeepSeek-V3, not V3.2
        assert cuda.cuda_graphs == (family == "deepseek_v3")


def engine_tokens(path: str, padded: bool, device: str = "cpu", **kwargs) -> tuple[list[list[int]], set]:
    """Greedy tokens of five requests that finish at different steps (the batch shrinks), through
    the engine; `padded`: decode steps padded to buckets (the CUDA-graph path; eager on the CPU)."""
    from server.engine import LLM
    from server.engine.request import EngineRequest, SamplingParams

    llm = LLM(path, dtype="float32", device=device, num_kv_blocks=64, block_size=4, max_num_seqs=8, **kwargs)
    core = llm.core
    if padded and device == "cpu":
        core.runner.enable_decode_graphs([1, 2, 4, 8], cuda_graphs=False)
    assert {lk.attention for lk in core.model.kernel_plan.layers} == {
        AttentionKernel.CPU if device == "cpu" else AttentionKernel.TRITON}
    buckets: set = set()
    orig = core.runner.execute

    def execute(batch):
        out = orig(batch)
        buckets.add(out.graph_bucket)
        return out

    core.runner.execute = execute
    for i, (n, m) in enumerate(zip((5, 17, 30, 3, 9), (12, 5, 9, 12, 7))):
        core.add_request(EngineRequest(f"r{i}", tokens(n, 10 + i),
                                       SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)))
    got: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step()[0]:
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert core.pool.num_free == core.pool.num_blocks
    return [got[f"r{i}"] for i in range(5)], buckets


@pytest.fixture(scope="module")
def deepseek_v3(family_checkpoint, tmp_path_factory) -> str:
    """The tiny DeepSeek-V3 checkpoint with a tokenizer (the engine loads one)."""
    import shutil

    from tests.conftest import save_test_tokenizer

    path = tmp_path_factory.mktemp("deepseek_v3-engine")
    shutil.copytree(family_checkpoint("deepseek_v3")[0], path, dirs_exist_ok=True)
    save_test_tokenizer(path)
    return str(path)


def test_padded_decode_steps_with_the_mla_kernel(deepseek_v3):
    """The decode step CUDA graphs replay, run eagerly on the CPU: padding rows (length 0) read
    nothing and change nothing, so the tokens equal the unpadded engine's."""
    path = deepseek_v3
    plain, none = engine_tokens(path, padded=False)
    padded, buckets = engine_tokens(path, padded=True)
    assert none == {None} and {2, 4, 8} & buckets, buckets
    assert padded == plain


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_deepseek_v3_decode_replays_cuda_graphs(deepseek_v3):
    """On a GPU the plan gives DeepSeek-V3's MLA layers the Triton kernel and its decode steps
    replay CUDA graphs, with the tokens of the eager engine."""
    path = deepseek_v3
    eager, _ = engine_tokens(path, padded=False, device="cuda", enforce_eager=True)
    graphs, buckets = engine_tokens(path, padded=True, device="cuda")
    assert {1, 2, 4, 8} & buckets, f"no decode step replayed a graph: {buckets}"
    assert graphs == eager
