"""The quantized Triton MoE / linear kernels (models/kernels/triton_qmoe.py) against a float64
reference built from `formats.dequant`, for every QTensor format.

On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)
in float32 (and float16 once; the interpreter's bfloat16 dots are wrong); it runs the fp8 x fp8 dots
of W8A8 exactly (its own fp32 -> fp8 cast is not used: see triton_qmoe). The `cuda` variants (pytest -m cuda,
scripts/gpu_check.sh) run the compiled kernels in bfloat16. W8A8 cases compare against a reference
that quantizes the activations the way the kernel does (per token, per group of bk, scale = amax /
448, round to nearest even), so the bound stays tight.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from models.kernels.triton_qmoe import qlinear_triton, qmoe_triton, quant_fp8_groups
from models.quant.formats import QTensor, WeightFormat, dequant, pack_nibbles
from tests.models.kernels.conftest import DEVICES, rel_err

F8 = torch.float8_e4m3fn


def make_q(fmt: str, shape: tuple[int, ...], g: torch.Generator, *, block=(128, 128), group=32, zp=False,
           scale_dtype=torch.float32) -> QTensor:
    """A random QTensor of logical shape [..., N, K]: random codes and scales (weights of about
    unit / sqrt(K) size), in the format's canonical layout."""
    *lead, N, K = shape
    amp = K**-0.5
    if fmt in ("fp8_block", "fp8_channel", "fp8_tensor"):
        data = (torch.randn(*shape, generator=g) * 64).clamp(-440, 440).to(F8)
        if fmt == "fp8_block":
            bn, bk = block
            sshape = (*lead, -(-N // bn), -(-K // bk))
        else:
            sshape = (*lead, N, 1) if fmt == "fp8_channel" else (*lead, 1, 1)
        scale = (torch.rand(*sshape, generator=g) + 0.5) * amp / 64
        return QTensor(WeightFormat(fmt), tuple(shape), data, scale, block=block if fmt == "fp8_block" else None)
    if fmt == "int8_channel":
        data = torch.randint(-127, 128, tuple(shape), generator=g, dtype=torch.int8)
        scale = (torch.rand(*lead, N, 1, generator=g) + 0.5) * amp / 64
        return QTensor(WeightFormat.INT8_CHANNEL, tuple(shape), data, scale)
    codes = torch.randint(0, 16, tuple(shape), generator=g)
    if fmt == "mxfp4":
        scale = torch.randint(124, 128, (*lead, N, K // 32), generator=g, dtype=torch.uint8)
        return QTensor(WeightFormat.MXFP4, tuple(shape), pack_nibbles(codes), scale, group=32)
    assert fmt == "int4_group"
    scale = ((torch.rand(*lead, N, K // group, generator=g) + 0.5) * amp / 4).to(scale_dtype)
    zero = torch.randint(0, 16, (*lead, N, K // group), generator=g, dtype=torch.uint8) if zp else None
    return QTensor(WeightFormat.INT4_GROUP, tuple(shape), pack_nibbles(codes), scale, zero=zero, group=group)


def fake_quant_fp8(x: torch.Tensor, group: int) -> torch.Tensor:
    """What W8A8 computes with: x [M, K] quantized per row per `group` as the kernel does, float64."""
    M, K = x.shape
    group = min(group, K)
    xg = x.float().reshape(M, -1, group)
    scale = xg.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448.0
    q = (xg / scale).clamp(-448, 448).to(F8)
    return (q.double() * scale.double()).reshape(M, K)


def moe_ref(x, w13: QTensor, w2: QTensor, ids, tw, b13=None, b2=None, limit=None, alpha=1.702,
            weight_on_input=False, a8_group: tuple[int, int] | None = None) -> torch.Tensor:
    """Per expert, in float64 from the dequantized weights; `a8_group`: the activation groups of
    x and of h when the kernel runs W8A8."""
    W13, W2 = dequant(w13.to("cpu"), torch.float64), dequant(w2.to("cpu"), torch.float64)
    act = x.dtype  # the kernel stores h in it before quantizing it (W8A8)
    x, ids, tw = x.cpu().double(), ids.cpu(), tw.cpu().double()
    if a8_group:
        x = fake_quant_fp8(x, a8_group[0])
    inter = W2.shape[-1]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), tw[t, j]
            v = x[t] * w if weight_on_input else x[t]
            h = W13[e] @ v + (b13[e].cpu().double() if b13 is not None else 0)
            gate, up = h[:inter], h[inter:]
            if limit is None:
                a = F.silu(gate) * up
            else:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
                a = (up + 1) * gate * torch.sigmoid(alpha * gate)
            if a8_group:
                a = fake_quant_fp8(a.to(act).float()[None], a8_group[1])[0]
            y = W2[e] @ a + (b2[e].cpu().double() if b2 is not None else 0)
            out[t] += y if weight_on_input else y * w
    return out


def routing(T, E, k, g):
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(k, -1)
    return ids, w


def a8_groups(q13: QTensor, q2: QTensor, H: int, inter: int) -> tuple[int, int]:
    """The activation groups W8A8 uses: bk for fp8_block, the whole row for channel / tensor."""
    return (q13.block[1] if q13.block else H, q2.block[1] if q2.block else inter)


CASES = {  # id -> (fmt, make_q kwargs, H, W8A8?, extra qmoe kwargs)
    "fp8_block-128": ("fp8_block", dict(block=(128, 128)), 128, True, {}),
    "fp8_block-32x32": ("fp8_block", dict(block=(32, 32)), 64, True, {}),
    "fp8_block-w8a16": ("fp8_block", dict(block=(32, 64)), 128, False, {}),
    "fp8_channel": ("fp8_channel", {}, 64, True, {}),
    "fp8_channel-w8a16": ("fp8_channel", {}, 64, False, {}),
    "fp8_tensor": ("fp8_tensor", {}, 128, True, {"weight_on_input": True}),
    "mxfp4": ("mxfp4", {}, 64, False, {}),
    "mxfp4-gptoss": ("mxfp4", {}, 128, False, {"bias": True, "limit": 7.0}),
    "int4-sym-g32": ("int4_group", dict(group=32), 64, False, {}),
    "int4-zp-g64": ("int4_group", dict(group=64, zp=True, scale_dtype=torch.float16), 128, False, {}),
    "int4-zp-g128": ("int4_group", dict(group=128, zp=True, scale_dtype=torch.bfloat16), 128, False,
                     {"weight_on_input": True}),
    "int8_channel": ("int8_channel", {}, 64, False, {"bias": True}),
}
INTER, E, K_TOP = 64, 4, 2


def run_case(case: str, T: int, device: str) -> float:
    fmt, kw, H, a8, extra = CASES[case]
    extra = dict(extra)
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()) + T)
    kw2 = dict(kw)
    if fmt == "int4_group":
        kw2["group"] = min(kw["group"], INTER)  # w2's K is I
    q13 = make_q(fmt, (E, 2 * INTER, H), g, **kw)
    q2 = make_q(fmt, (E, H, INTER), g, **kw2)
    x = torch.randn(T, H, generator=g)
    ids, tw = routing(T, E, K_TOP, g)
    b13 = b2 = None
    if extra.pop("bias", False):
        b13, b2 = torch.randn(E, 2 * INTER, generator=g) * 0.1, torch.randn(E, H, generator=g) * 0.1
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    xd = x.to(device, dtype)
    out = qmoe_triton(xd, q13.to(device), q2.to(device), ids.to(device), tw.to(device), fp8_act=a8,
                      b13=None if b13 is None else b13.to(device), b2=None if b2 is None else b2.to(device), **extra)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = moe_ref(xd, q13, q2, ids, tw, b13, b2, a8_group=a8_groups(q13, q2, H, INTER) if a8 else None, **extra)
    return rel_err(out.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_qmoe_matches_dequant_reference(case, T, device):
    a8 = CASES[case][3]
    # float32 on the CPU: float rounding only (W8A8: h rounds to fp8 at a rare other boundary);
    # bfloat16 on CUDA: h and the dequantized weight tiles round to bf16
    bound = (2e-2 if a8 else 1e-5) if device == "cpu" else 4e-2
    assert rel_err_ok(run_case(case, T, device), bound)


@pytest.mark.parametrize("case", ["int4-zp-g64", "fp8_block-32x32"])
def test_qmoe_float16_activations(case):
    """Half-precision activations on the CPU: the interpreter has float16 (not bfloat16: its bf16
    dots are wrong, for the float kernels too), so the 16-bit tile path is checked here in float16."""
    fmt, kw, H, a8, _ = CASES[case]
    g = torch.Generator().manual_seed(11)
    q13, q2 = make_q(fmt, (E, 2 * INTER, H), g, **kw), make_q(fmt, (E, H, INTER), g, **kw)
    x = torch.randn(5, H, generator=g).half()
    ids, tw = routing(5, E, K_TOP, g)
    out = qmoe_triton(x, q13, q2, ids, tw, fp8_act=a8)
    assert out.dtype == torch.float16
    ref = moe_ref(x, q13, q2, ids, tw, a8_group=a8_groups(q13, q2, H, INTER) if a8 else None)
    assert rel_err_ok(rel_err(out, ref), 2e-2)


def rel_err_ok(err: float, bound: float) -> bool:
    if not err < bound:
        raise AssertionError(f"relative error {err:.3g} >= {bound}")
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["fp8_block-32x32", "fp8_channel", "fp8_tensor-w8a16", "mxfp4", "int4-zp-g32",
                                  "int4-sym-g64", "int8_channel"])
def test_qlinear_matches_dequant_reference(case, device):
    fmt = case.split("-")[0].replace("int4", "int4_group")
    a8 = fmt.startswith("fp8") and not case.endswith("w8a16")
    kw: dict = {}
    if case == "fp8_block-32x32":
        kw = dict(block=(32, 32))
    if fmt == "int4_group":
        kw = dict(group=int(case.split("g")[-1]), zp="zp" in case)
    g = torch.Generator().manual_seed(7)
    M, N, K = 5, 48, 128  # N not a multiple of the tile
    q = make_q(fmt, (N, K), g, **kw)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g) * 0.1
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    xd = x.to(device, dtype)
    out = qlinear_triton(xd, q.to(device), bias.to(device), fp8_act=a8)
    assert out.shape == (M, N) and out.dtype == dtype
    xr = xd.cpu().double()
    if a8:
        xr = fake_quant_fp8(xr, q.block[1] if q.block else K)
    ref = xr @ dequant(q, torch.float64).T + bias.double()
    assert rel_err_ok(rel_err(out.cpu(), ref), (1e-2 if a8 else 1e-5) if device == "cpu" else 2e-2)


@pytest.mark.parametrize("fmt,K,kw", [("mxfp4", 96, {}), ("int4_group", 96, dict(group=32, zp=True)),
                                       ("fp8_block", 96, dict(block=(64, 64))), ("int8_channel", 72, {})],
                         ids=["mxfp4", "int4", "fp8_block", "int8"])
def test_qlinear_k_tail(fmt, K, kw):
    """K not a multiple of the K tile (64 here): the last tile is masked, scales and codes alike."""
    g = torch.Generator().manual_seed(5)
    q = make_q(fmt, (40, K), g, **kw)
    x = torch.randn(3, K, generator=g)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=1)
    a8 = fmt == "fp8_block"
    out = qlinear_triton(x, q, config=cfg, fp8_act=a8)
    xr = x.double()
    if a8:  # K = 96 in groups of 64: the second group has 32 inputs
        xr = torch.cat([fake_quant_fp8(x[:, :64].double(), 64), fake_quant_fp8(x[:, 64:].double(), 32)], 1)
    ref = xr @ dequant(q, torch.float64).T
    assert rel_err_ok(rel_err(out, ref), 1e-2 if a8 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_activation_quant_rounds_like_torch(device):
    """The per-group fp8 quantization (its own rounding, see triton_qmoe) equals torch's cast,
    including the values that round up into the next binade."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 256, generator=g) * torch.logspace(-3, 3, 256)
    x[0, :8] = torch.tensor([7.8216, -31.8131, 0.0, 1e-6, -448.0, 15.9, 239.9, -0.017])
    q, s = quant_fp8_groups(x.to(device), 128)
    assert s.shape == (2, 2)
    scale = x.reshape(2, 2, 128).abs().amax(-1).clamp_min(1e-10) / 448.0
    torch.testing.assert_close(s.cpu(), scale, rtol=0, atol=0)
    ref = (x.reshape(2, 2, 128) / scale[..., None]).clamp(-448, 448).to(F8).reshape(2, 256)
    assert torch.equal(q.cpu().view(torch.uint8), ref.view(torch.uint8))


def test_no_tokens_and_shape_errors():
    g = torch.Generator().manual_seed(1)
    q13, q2 = make_q("mxfp4", (E, 2 * INTER, 64), g), make_q("mxfp4", (E, 64, INTER), g)
    ids, tw = routing(0, E, K_TOP, g)
    assert qmoe_triton(torch.zeros(0, 64), q13, q2, ids, tw).shape == (0, 64)
    with pytest.raises(ValueError, match="shapes"):
        qmoe_triton(torch.zeros(1, 64), q13, q13, *routing(1, E, K_TOP, g))
    with pytest.raises(ValueError, match="inputs"):
        qlinear_triton(torch.zeros(1, 32), make_q("int8_channel", (8, 64), g))
    bad = make_q("int4_group", (8, 64), g, group=32)
    bad.group = 128  # scales of group 32 read as group 128: refused, not read out of bounds
    with pytest.raises(ValueError, match="scales"):
        qlinear_triton(torch.zeros(1, 64), bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp4", "int4_group"])
@pytest.mark.parametrize("T", [1, 200])
def test_cuda_real_shapes(fmt, T):
    """Tiles of the real decode / prefill configs (BLOCK_K 128 / 64 over K 1024, block 128x128),
    fp8 dots on sm89+ (W8A16 below), bfloat16."""
    g = torch.Generator().manual_seed(T)
    H, inter, E_, k = 1024, 512, 16, 4
    kw = dict(group=128, zp=True, scale_dtype=torch.bfloat16) if fmt == "int4_group" else {}
    q13, q2 = make_q(fmt, (E_, 2 * inter, H), g, **kw), make_q(fmt, (E_, H, inter), g, **kw)
    x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
    ids, tw = routing(T, E_, k, g)
    out = qmoe_triton(x, q13.to("cuda"), q2.to("cuda"), ids.cuda(), tw.cuda())
    from models.kernels.triton_qmoe import fp8_dot_supported

    a8 = fmt == "fp8_block" and fp8_dot_supported(x.device)
    ref = moe_ref(x, q13, q2, ids, tw, a8_group=(128, 128) if a8 else None)
    assert rel_err_ok(rel_err(out.cpu(), ref), 4e-2)
