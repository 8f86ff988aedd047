"""MLA decode over the paged latent cache, absorbed form: the C (CPU) and Triton kernels, with the
weights absorbed as the layer prepares them (`absorbed_weights`), against the un-absorbed math
(each head's K and V expanded from the latents through kv_b_proj) in float64, with ragged
lengths, zero-length rows, scattered block tables and a rotary row wider than the rotary key
(DSA's index key after it)."""

from __future__ import annotations

import pytest
import torch

from models.kernels import cpu_ops
from models.kernels.mla_decode import absorbed_weights, mla_decode
from models.kernels.plan import AttentionKernel
from tests.models.kernels.conftest import DEVICES, rel_err, torch_threads


def make_case(B, H, r, dr, dn, dv, block_size, max_len, pe_extra=0, device="cpu", dtype=torch.float32, seed=0,
              zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    width = -(-max_len // block_size)
    num_blocks = B * width + 3
    q = torch.randn(B, H, dn + dr, generator=g)  # as in the layer: q_nope and q_pe are views of one q
    c = {
        "q_nope": q[..., :dn],
        "q_pe": q[..., dn:],
        "kv_b": torch.randn(H * (dn + dv), r, generator=g) * r**-0.5,
        "lat": torch.randn(num_blocks, block_size, 1, r, generator=g),
        "pe": torch.randn(num_blocks, block_size, 1, dr + pe_extra, generator=g),
        "tables": torch.randperm(num_blocks, generator=g)[: B * width].view(B, width),  # scattered blocks
        "lens": torch.randint(1, max_len + 1, (B,), generator=g),
    }
    for z in zero_rows:
        c["lens"][z] = 0
    c = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in c.items()}
    q = torch.cat((c["q_nope"], c["q_pe"]), -1)
    return {**c, "q_nope": q[..., :dn], "q_pe": q[..., dn:]}


def unabsorbed(c, dn, dv, scale):
    """Each row, each head written out in float64: K = [W_uk c, k_pe], V = W_uv c, softmax(q K^T) V."""
    B, H, _ = c["q_nope"].shape
    bs, r, dr = c["lat"].shape[1], c["lat"].shape[-1], c["q_pe"].shape[-1]
    w = c["kv_b"].double().view(H, dn + dv, r)
    out = torch.zeros(B, H, dv, dtype=torch.float64)
    for b in range(B):
        L = int(c["lens"][b])
        slots = [int(c["tables"][b, t // bs]) * bs + t % bs for t in range(L)]
        lat = c["lat"].reshape(-1, r)[slots].double().cpu()
        pe = c["pe"].reshape(-1, c["pe"].shape[-1])[slots, :dr].double().cpu()
        for h in range(H):
            k = torch.cat((lat @ w[h, :dn].T.cpu(), pe), dim=-1)  # [L, dn + dr]
            v = lat @ w[h, dn:].T.cpu()  # [L, dv]
            q = torch.cat((c["q_nope"][b, h], c["q_pe"][b, h])).double().cpu()
            out[b, h] = torch.softmax(k @ q * scale, dim=0) @ v
    return out


def run(c, H, dn, dv, scale, kernel):
    w_uk, w_uv_t = absorbed_weights(c["kv_b"], H, dn, dv)
    return mla_decode(c["q_nope"], c["q_pe"], w_uk, w_uv_t, c["lat"], c["pe"], c["tables"], c["lens"], scale, kernel)


CASES = [  # B, heads, kv_lora_rank, rope dim, nope dim, v dim, block size, longest context, rotary row extra
    (1, 8, 128, 32, 64, 64, 16, 300, 0),  # one row, long: heads split over threads
    (9, 4, 32, 8, 16, 16, 4, 41, 16),  # many rows (DSA-wide rotary row), tiny blocks
    (5, 3, 48, 24, 16, 8, 8, 37, 0),  # sizes not powers of two
    # the C kernel's tails: latent and rotary sizes no multiple of 8, heads past a group of 4 (and
    # of 8: one vector of softmax, the rest one by one), a latent tile of 8 after those of 16
    (3, 6, 36, 12, 16, 8, 8, 29, 0),
    (2, 12, 40, 8, 8, 8, 4, 23, 0),
]
IDS = [f"B{c[0]}-h{c[1]}-r{c[2]}-dr{c[3]}" for c in CASES]


def absorbed_equals_unabsorbed(case, kernel, device, threads=None):
    B, H, r, dr, dn, dv, bs, max_len, extra = case
    c = make_case(B, H, r, dr, dn, dv, bs, max_len, extra, device=device, zero_rows=(B - 1,) if B > 1 else ())
    scale = (dn + dr) ** -0.5
    out = run(c, H, dn, dv, scale, kernel)
    assert out.shape == (B, H, dv)
    if B > 1:
        assert out[B - 1].abs().max() == 0  # a zero-length (graph padding) row writes zeros
    keep = (c["lens"] > 0).cpu()
    assert rel_err(out.cpu()[keep], unabsorbed(c, dn, dv, scale)[keep]) < 2e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_kernel_matches_unabsorbed_float64(case):
    assert cpu_ops.load() is not None, "the C kernel must build here (a C compiler is a test requirement)"
    for threads in (1, 2):
        with torch_threads(threads):
            absorbed_equals_unabsorbed(case, AttentionKernel.CPU, "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[1:], ids=IDS[1:])
def test_triton_kernel_matches_unabsorbed_float64(case, device):
    absorbed_equals_unabsorbed(case, AttentionKernel.TRITON, device)


def test_cpu_kernel_rejects_mismatched_shapes():
    assert cpu_ops.load() is not None
    c = make_case(2, 4, 32, 8, 16, 16, 4, 10)
    q_lat = torch.randn(2, 4, 16)  # not the latent width
    with pytest.raises(RuntimeError, match="latent width"):
        cpu_ops.ops().mla_decode_cpu(q_lat, c["q_pe"], c["lat"], c["pe"], c["tables"], c["lens"], 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_triton_bf16_error_within_reference_bf16_error():
    """At DeepSeek-V3's latent sizes in bf16 the kernel is no further from exact math than the
    layer's PyTorch path (absorbed, SDPA over the gathered latents) in bf16."""
    B, H, r, dr, dn, dv = 8, 16, 512, 64, 128, 128
    c = make_case(B, H, r, dr, dn, dv, 16, 500, device="cuda")
    scale = (dn + dr) ** -0.5
    exact = unabsorbed(c, dn, dv, scale)
    cb = {k: v.bfloat16() if v.is_floating_point() else v for k, v in c.items()}
    out = run(cb, H, dn, dv, scale, AttentionKernel.TRITON)
    w_uk, w_uv_t = absorbed_weights(cb["kv_b"], H, dn, dv)
    q_lat = torch.bmm(cb["q_nope"].transpose(0, 1), w_uk).transpose(0, 1)
    nb = cb["tables"].shape[1]
    lat = cb["lat"][cb["tables"][:, :nb]].flatten(1, 2)  # [B, L, 1, r]
    keys = torch.cat((lat, cb["pe"][cb["tables"]].flatten(1, 2)), dim=-1)
    pos = torch.arange(keys.shape[1], device="cuda")
    mask = (pos[None, :] < cb["lens"][:, None])[:, None, None, :]
    o_lat = torch.nn.functional.scaled_dot_product_attention(
        torch.cat((q_lat, cb["q_pe"]), -1)[:, None], keys.transpose(1, 2), lat.transpose(1, 2), attn_mask=mask,
        scale=scale)[:, 0]
    ref = torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)
    assert rel_err(out.cpu(), exact) <= 1.5 * rel_err(ref.cpu(), exact) + 1e-3


def test_opcheck_mla_cpu_op():
    """The C op registered right (schema, fake implementation, dynamic shapes): `torch.compile`
    traces through it. (The Triton op's fake: checked where a GPU runs the cuda group.)"""
    assert cpu_ops.load() is not None
    c = make_case(3, 4, 32, 8, 16, 16, 4, 10, pe_extra=16)
    args = (torch.randn(3, 4, 32), c["q_pe"], c["lat"], c["pe"], c["tables"], c["lens"], 0.25)
    torch.library.opcheck(torch.ops.moe_serve.mla_decode_cpu.default, args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_opcheck_mla_triton_op():
    from models.kernels import triton_mla  # noqa: F401 - registers the op

    c = make_case(3, 4, 32, 8, 16, 16, 4, 10, pe_extra=16, device="cuda")
    args = (torch.randn(3, 4, 32, device="cuda"), c["q_pe"], c["lat"], c["pe"], c["tables"], c["lens"], 0.25)
    torch.library.opcheck(torch.ops.moe_serve.mla_decode_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
