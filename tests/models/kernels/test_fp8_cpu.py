"""The C fp8 weight kernels (csrc/fp8_cpu.c: `fp8_linear_cpu`, `fp8_moe_cpu`, called by
models.quant.ops on the CPU): every fp8 layout of QTensor at each instruction-set level this CPU
runs against a float64 reference of the dequantized math (M = 1, 7, 33: one tile, a partial tile,
the converted-chunk path; K and N tails where the layout allows them), the family variants of the
experts, and the e4m3 conversion of all 256 byte values against torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.quant import ops as qops
from models.quant.formats import QTensor, WeightFormat
from models.quant.weights import quantize_fp8_channel
from tests.models.kernels.conftest import rel_err
from tests.models.kernels.test_quant import isa  # noqa: F401 - the level fixture (each level this CPU runs)

ROWS = (1, 7, 33)


def fp8_weight(w: torch.Tensor, fmt: str, block: tuple[int, int] = (128, 128)) -> QTensor:
    """A float weight [..., N, K] in `fmt` (scales from each block's / row's / tensor's max)."""
    *lead, N, K = w.shape
    if fmt == "fp8_channel":
        return quantize_fp8_channel(w)
    if fmt == "fp8_tensor":
        s = (w.abs().amax(dim=(-2, -1), keepdim=True) / 448).clamp(min=1e-12)
        return QTensor(WeightFormat.FP8_TENSOR, tuple(w.shape), (w / s).to(torch.float8_e4m3fn), s.float())
    bn, bk = block
    nb, kb = -(-N // bn), -(-K // bk)
    pad = F.pad(w, (0, kb * bk - K, 0, nb * bn - N))
    tiles = pad.reshape(*lead, nb, bn, kb, bk)
    s = (tiles.abs().amax(dim=(-3, -1)) / 448).clamp(min=1e-12)  # [..., nb, kb]
    full = s.repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
    return QTensor(WeightFormat.FP8_BLOCK, tuple(w.shape), (w / full).to(torch.float8_e4m3fn), s.float().contiguous(),
                   block=block)


# (format, block, N, K): DeepSeek's 128x128 with partial blocks in both dims, a small block whose
# size is no multiple of the vector step (16 / 32: a scalar tail in every block), channel and tensor
# scales with a K that is no multiple of 16 and an N that is no multiple of 16
LAYOUTS = [("fp8_block", (128, 128), 200, 328), ("fp8_block", (16, 24), 40, 72), ("fp8_channel", None, 40, 100),
           ("fp8_tensor", None, 56, 96)]


@pytest.mark.parametrize("fmt, block, N, K", LAYOUTS, ids=[f"{f}-{N}x{K}" for f, _, N, K in LAYOUTS])
def test_fp8_linear_matches_dequantized_math(isa, fmt, block, N, K):  # noqa: F811
    g = torch.Generator().manual_seed(11)
    w = fp8_weight(torch.randn(N, K, generator=g) * 0.05, fmt, block or (128, 128))
    bias = torch.randn(N, generator=g)
    ref_w = w.dequant(torch.float64)
    for rows in ROWS:
        x = torch.randn(rows, K, generator=g)
        out = qops.qlinear_cpu(x, w, bias)
        assert out.dtype == torch.float32 and out.shape == (rows, N)
        assert rel_err(out, x.double() @ ref_w.T + bias.double()) < 2e-6, rows
    # the rows of a batch are computed as they would be alone (batch invariance)
    x = torch.randn(33, K, generator=g)
    assert torch.equal(qops.qlinear_cpu(x, w)[5], qops.qlinear_cpu(x[5:6], w)[0])
    assert qops.qlinear_cpu(torch.randn(0, K), w).shape == (0, N)


def reference_experts(x, w13: QTensor, w2: QTensor, ids, tw, b13=None, b2=None, limit=None, alpha=1.702,
                      weight_on_input=False):
    """float64 over the dequantized stacks, token by token."""
    W13, W2 = w13.dequant(torch.float64), w2.dequant(torch.float64)
    inter = W2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e, wt = int(ids[t, s]), float(tw[t, s])
            xt = x[t].double() * (wt if weight_on_input else 1.0)
            h = W13[e] @ xt + (0 if b13 is None else b13[e].double())
            if limit is None:
                a = F.silu(h[:inter]) * h[inter:]
            else:
                a = qops.clamped_swiglu(h[None], inter, alpha, limit)[0]
            y = W2[e] @ a + (0 if b2 is None else b2[e].double())
            out[t] += y if weight_on_input else wt * y
    return out


# (format, block, H, I): 128x128 blocks over H = 256 with I = 160 (a partial block: gate and up
# share the one at their seam), a channel layout with H and I no multiples of 16, tensor scales
EXPERT_LAYOUTS = [("fp8_block", (128, 128), 256, 160), ("fp8_block", (16, 16), 64, 48),
                  ("fp8_channel", None, 72, 40), ("fp8_tensor", None, 64, 96)]


@pytest.mark.parametrize("fmt, block, H, I", EXPERT_LAYOUTS, ids=[f"{f}-{H}x{I}" for f, _, H, I in EXPERT_LAYOUTS])
def test_fp8_experts_match_dequantized_math(isa, fmt, block, H, I):  # noqa: F811, E741
    g = torch.Generator().manual_seed(13)
    E, k = 4, 2
    w13 = fp8_weight(torch.randn(E, 2 * I, H, generator=g) * 0.1, fmt, block or (128, 128))
    w2 = fp8_weight(torch.randn(E, H, I, generator=g) * 0.1, fmt, block or (128, 128))
    for T in ROWS:  # 33 tokens of top-2 over 4 experts: more rows per expert than a tile
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        tw = torch.rand(T, k, generator=g)
        out = qops.qmoe_cpu(x, w13, w2, ids, tw)
        assert rel_err(out, reference_experts(x, w13, w2, ids, tw)) < 2e-6, T
    # a pair of routing weight 0 (the placement executor's padding) adds nothing
    tw[0, 1] = 0.0
    assert rel_err(qops.qmoe_cpu(x, w13, w2, ids, tw), reference_experts(x, w13, w2, ids, tw)) < 2e-6


@pytest.mark.parametrize("variant", ["biased clamped", "input-scaled"])
def test_fp8_experts_family_variants(isa, variant):  # noqa: F811
    """gpt-oss's biases and clamped SwiGLU, Llama 4's routing weights on the input."""
    g = torch.Generator().manual_seed(17)
    E, k, H, I = 4, 2, 64, 48  # noqa: E741
    w13 = fp8_weight(torch.randn(E, 2 * I, H, generator=g) * 0.2, "fp8_block", (16, 32))
    w2 = fp8_weight(torch.randn(E, H, I, generator=g) * 0.2, "fp8_block", (16, 32))
    kw = (dict(b13=torch.randn(E, 2 * I, generator=g), b2=torch.randn(E, H, generator=g), limit=0.7, alpha=1.702)
          if variant == "biased clamped" else dict(weight_on_input=True))
    for T in ROWS:
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        tw = torch.rand(T, k, generator=g)
        out = qops.qmoe_cpu(x, w13, w2, ids, tw, **kw)
        assert rel_err(out, reference_experts(x, w13, w2, ids, tw, **kw)) < 2e-6, T
        # models.quant.ops.qmoe takes this path on the CPU, and the torch reference when told to
        ref = qops.qmoe(x, w13, w2, ids, tw, cpu=False, **kw)
        assert rel_err(qops.qmoe(x, w13, w2, ids, tw, **kw), ref) < 1e-5


def test_e4m3_conversion_of_every_byte_equals_torch(isa):  # noqa: F811
    """All 256 byte values (subnormals, both zeros, 448, the NaNs 0x7f / 0xff) through the kernel:
    row n of W holds byte n everywhere, x = e_0, scale 1: y[0, n] is the kernel's value of byte n,
    exactly; per tensor and per channel, over the vector steps (K = 32, 64) and the scalar tail (K = 5)."""
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    assert want.isnan().sum() == 2
    for K in (5, 32, 64):
        data = codes[:, None].expand(256, K).contiguous().view(torch.float8_e4m3fn)
        x = torch.zeros(1, K)
        x[0, 0] = 1.0
        for q in (QTensor(WeightFormat.FP8_CHANNEL, (256, K), data, torch.ones(256, 1)),
                  QTensor(WeightFormat.FP8_TENSOR, (256, K), data, torch.ones(1, 1))):
            got = qops.qlinear_cpu(x, q)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # every finite byte at every lane of a step: W [16, 256] of the codes (rows rotated; the NaNs as 0)
    g = torch.Generator().manual_seed(19)
    finite_codes = torch.where(want.isnan(), 0, codes.int()).to(torch.uint8)
    rows = torch.stack([finite_codes.roll(r) for r in range(16)])
    x = torch.randn(16, 256, generator=g)
    q = QTensor(WeightFormat.FP8_CHANNEL, (16, 256), rows.contiguous().view(torch.float8_e4m3fn), torch.ones(16, 1))
    ref = x.double() @ rows.view(torch.float8_e4m3fn).double().T
    assert rel_err(qops.qlinear_cpu(x, q), ref) < 1e-7
    # a NaN byte at any lane makes its row's output NaN
    nan_rows = torch.full((32, 32), 0x38, dtype=torch.uint8)  # 1.0
    nan_rows[torch.arange(32), torch.arange(32)] = torch.tensor([0x7F, 0xFF], dtype=torch.uint8).repeat(16)
    q = QTensor(WeightFormat.FP8_TENSOR, (32, 32), nan_rows.view(torch.float8_e4m3fn), torch.ones(1, 1))
    assert qops.qlinear_cpu(torch.ones(1, 32), q).isnan().all()


def test_the_ops_refuse_what_they_do_not_serve(isa):  # noqa: F811
    w = fp8_weight(torch.randn(32, 64), "fp8_block", (16, 16))
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.moe_serve.fp8_linear_cpu(torch.randn(2, 64), w.data, w.scale, 32, 16, None)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        torch.ops.moe_serve.fp8_linear_cpu(torch.randn(2, 64), w.data.view(torch.uint8), w.scale, 16, 16, None)
    with pytest.raises(RuntimeError, match=r"\[M, K\]"):
        torch.ops.moe_serve.fp8_linear_cpu(torch.randn(2, 63), w.data, w.scale, 16, 16, None)
    w13, w2 = fp8_weight(torch.randn(2, 64, 32), "fp8_channel"), fp8_weight(torch.randn(2, 32, 32), "fp8_channel")
    with pytest.raises(IndexError, match="expert id"):
        qops.qmoe_cpu(torch.randn(1, 32), w13, w2, torch.tensor([[2]]), torch.ones(1, 1))


def test_opcheck_fp8_ops(isa):  # noqa: F811
    """Fake implementation and dispatch of both ops (torch.library.opcheck; its schema check
    compares tensors with ops torch lacks for float8 on the CPU: left out)."""
    g = torch.Generator().manual_seed(23)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    w = fp8_weight(torch.randn(48, 40, generator=g), "fp8_block", (16, 16))
    torch.library.opcheck(torch.ops.moe_serve.fp8_linear_cpu.default,
                          (torch.randn(5, 40, generator=g), w.data, w.scale, 16, 16, torch.randn(48, generator=g)),
                          test_utils=checks)
    w13, w2 = fp8_weight(torch.randn(4, 64, 32, generator=g), "fp8_channel"), fp8_weight(
        torch.randn(4, 32, 32, generator=g), "fp8_channel")
    ids, tw = torch.randint(0, 4, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    torch.library.opcheck(torch.ops.moe_serve.fp8_moe_cpu.default,
                          (torch.randn(5, 32, generator=g), ids, tw, w13.data, w13.scale, 1, 32, w2.data, w2.scale,
                           1, 32, torch.randn(4, 64, generator=g), torch.randn(4, 32, generator=g), 7.0, 1.702, False),
                          test_utils=checks)
