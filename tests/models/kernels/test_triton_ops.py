"""The small fused Triton ops against the layers' PyTorch code, and a whole model with every
Triton kernel on (interpreted on the CPU) against the same model on the reference paths."""

from __future__ import annotations

import pytest
import torch

from models import load_model
from tests.models.simple_runner import prefill_logits
from models.kernels.flags import KernelFlags
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding
from tests.models.kernels.conftest import DEVICES, rel_err, rope_reference

# float32: the same roundings, so (nearly) exact; bf16: the interpreter rounds differently
# from the GPU, so a bound of a few bf16 ulps
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rmsnorm_with_and_without_residual(device, dtype):
    from models.kernels.triton_ops import rmsnorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(device, dtype)
    norm.weight.data.copy_(torch.randn(96, generator=g) * 0.1 + 1)
    x = torch.randn(7, 96, generator=g).to(device, dtype)
    r = torch.randn(7, 96, generator=g).to(device, dtype)
    out, total = rmsnorm(x, norm.weight, norm.eps, residual=r)
    assert rel_err(total.cpu(), (x + r).cpu()) < TOL[dtype]
    assert rel_err(out.cpu(), norm(x + r).cpu()) < TOL[dtype]
    out, none = rmsnorm(x, norm.weight, norm.eps)
    assert none is None and rel_err(out.cpu(), norm(x).cpu()) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "head-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_write_kv(device, qk_norm, dtype):
    from models.kernels.triton_ops import rope_write_kv

    g = torch.Generator().manual_seed(1)
    H, KVH, D, T = 6, 2, 32, 5
    rot = RotaryEmbedding(D, 10000.0).to(device)
    cos, sin = rot.cos_sin(torch.tensor([0, 3, 7, 100, 4], device=device), dtype)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(device, dtype)
    k_cache = torch.full((10, 4, KVH, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.tensor([1, 5, 9, 22, 39], device=device)
    qn, kn = RMSNorm(D, 1e-6).to(device, dtype), RMSNorm(D, 1e-6).to(device, dtype)
    qn.weight.data.copy_(torch.randn(D, generator=g) * 0.1 + 1)
    kn.weight.data.copy_(torch.randn(D, generator=g) * 0.1 + 1)
    q_ref, k_ref, v_ref = rope_reference(qkv, cos, sin, H, KVH, D, qn if qk_norm else None, kn if qk_norm else None)
    q = rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, H, KVH, D,
                      qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6)
    assert rel_err(q.cpu(), q_ref.cpu()) < TOL[dtype]
    assert rel_err(k_cache.view(-1, KVH, D)[slots].cpu(), k_ref.cpu()) < TOL[dtype]
    assert torch.equal(v_cache.view(-1, KVH, D)[slots].cpu(), v_ref.cpu())
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert k_cache.view(-1, KVH, D)[untouched.to(device)].isnan().all()  # nothing else written


@pytest.mark.parametrize("device,family", [("cpu", "qwen3_moe"), *[
    pytest.param("cuda", f, marks=DEVICES[1].marks, id=f"cuda-{f}") for f in ("mixtral", "qwen3_moe")]])
def test_model_with_all_triton_kernels_matches_reference_paths(family, family_checkpoint, device):
    """Prefill + one decode step through every Triton kernel (fused norms, rotary + KV store,
    paged decode, fused MoE) against the PyTorch reference paths, same weights, float32."""
    from tests.models.simple_runner import SimpleRunner

    path, _ = family_checkpoint(family)
    prompts = [[5, 9, 23, 7, 81, 3], [11, 2, 40]]
    logits, decoded = {}, {}
    for name, kernels in (("triton", KernelFlags(attention="triton", moe="triton", fused_ops="triton")),
                          ("reference", KernelFlags(attention="reference", moe="reference", fused_ops="torch"))):
        model = load_model(path, dtype="float32", device=device, progress=False, kernels=kernels)
        logits[name] = torch.cat(prefill_logits(model, prompts)).cpu()
        runner = SimpleRunner(model, 16, 2)
        runner.step([0, 1], prompts, [0, 0])
        with torch.inference_mode():
            decoded[name] = model.compute_logits(runner.step([0, 1], [[4], [6]], [6, 3])).cpu()
    assert rel_err(logits["triton"], logits["reference"]) < 1e-5
    assert rel_err(decoded["triton"], decoded["reference"]) < 1e-5
