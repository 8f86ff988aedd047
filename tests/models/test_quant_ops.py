"""models.quant.ops on the CPU: `qmoe` / `qlinear` over QTensors in every format (fp8 block /
channel / tensor, mxfp4, int4_group, int8_channel) equal the float kernels (`moe_loop`, F.linear) over the
dequantized weights, family variants included, and dequantize only the experts a batch routes to;
`QParam` writes slice by slice (fused rows, stacked experts, fp8 blocks) and refuses misaligned rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.quant.formats as formats
from models.kernels.fused_moe import ExpertVariant, moe_loop
from models.quant.formats import FormatError, QTensor, WeightFormat, pack_nibbles
from models.quant.ops import qlinear, qmoe
from models.quant.weights import QParam, permute_rows, quantize_fp8_channel

E, H, INTER, T, K = 4, 64, 32, 6, 2


def make(fmt: WeightFormat, shape: tuple[int, ...], gen: torch.Generator) -> QTensor:
    """A random QTensor of `shape` in `fmt` (valid codes and positive scales)."""
    *lead, N, Kin = shape
    if fmt == WeightFormat.MXFP4:
        codes = torch.randint(0, 16, (*lead, N, Kin), generator=gen)
        scale = torch.randint(120, 128, (*lead, N, Kin // 32), generator=gen).to(torch.uint8)
        return QTensor(fmt, shape, pack_nibbles(codes), scale, group=32)
    if fmt == WeightFormat.INT8_CHANNEL:
        data = torch.randint(-127, 128, shape, generator=gen).to(torch.int8)
        return QTensor(fmt, shape, data, torch.rand(*lead, N, 1, generator=gen) * 1e-2 + 1e-3)
    if fmt == WeightFormat.INT4_GROUP:  # asymmetric: zero points per group
        codes = torch.randint(0, 16, (*lead, N, Kin), generator=gen)
        scale = (torch.rand(*lead, N, Kin // 32, generator=gen) * 1e-2 + 1e-3).half()
        zero = torch.randint(0, 16, (*lead, N, Kin // 32), generator=gen).to(torch.uint8)
        return QTensor(fmt, shape, pack_nibbles(codes), scale, zero=zero, group=32)
    data = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    if fmt == WeightFormat.FP8_BLOCK:
        s = (*lead, -(-N // 16), -(-Kin // 32))
        return QTensor(fmt, shape, data, torch.rand(s, generator=gen) * 1e-3 + 1e-4, block=(16, 32))
    s = (*lead, N, 1) if fmt == WeightFormat.FP8_CHANNEL else (*lead, 1, 1)
    return QTensor(fmt, shape, data, torch.rand(s, generator=gen) * 1e-3 + 1e-4)


FORMATS = [WeightFormat.FP8_BLOCK, WeightFormat.FP8_CHANNEL, WeightFormat.FP8_TENSOR, WeightFormat.MXFP4,
           WeightFormat.INT4_GROUP, WeightFormat.INT8_CHANNEL]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("variant", [None, ExpertVariant(bias=True, limit=0.5, alpha=1.702),
                                     ExpertVariant(weight_on_input=True)], ids=["swiglu", "gpt-oss", "llama4"])
def test_qmoe_matches_the_float_loop(fmt, variant):
    gen = torch.Generator().manual_seed(3)
    w13, w2 = make(fmt, (E, 2 * INTER, H), gen), make(fmt, (E, H, INTER), gen)
    x = torch.randn(T, H, generator=gen)
    ids = torch.randint(0, E, (T, K), generator=gen)
    w = torch.rand(T, K, generator=gen)
    f13, f2 = w13.dequant(), w2.dequant()
    b13 = b2 = None
    if variant is not None and variant.bias:  # the float loop takes them as one more input column
        b13, b2 = torch.randn(E, 2 * INTER, generator=gen), torch.randn(E, H, generator=gen)
        f13, f2 = torch.cat((f13, b13[..., None]), -1), torch.cat((f2, b2[..., None]), -1)
    want = moe_loop(x, f13, f2, ids, w, variant)
    got = qmoe(x, w13, w2, ids, w, b13=b13, b2=b2, limit=None if variant is None else variant.limit,
               weight_on_input=variant is not None and variant.weight_on_input)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qmoe_dequantizes_only_the_routed_experts(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    w13, w2 = make(WeightFormat.FP8_CHANNEL, (E, 2 * INTER, H), gen), make(WeightFormat.FP8_CHANNEL, (E, H, INTER), gen)
    seen: list[tuple[int, ...]] = []
    real = formats.dequant

    def counting(q, dtype=torch.float32):
        seen.append(tuple(q.shape))
        return real(q, dtype)

    monkeypatch.setattr(formats, "dequant", counting)
    ids = torch.tensor([[1, 3], [3, 1]])
    qmoe(torch.randn(2, H, generator=gen), w13, w2, ids, torch.ones(2, 2), cpu=False)  # the torch reference
    # one expert's w13 and w2 at a time, two experts: never a stack
    assert sorted(seen) == sorted([(2 * INTER, H), (H, INTER)] * 2)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_qlinear_matches_f_linear(fmt):
    gen = torch.Generator().manual_seed(5)
    w = make(fmt, (48, H), gen)
    x, bias = torch.randn(5, H, generator=gen), torch.randn(48, generator=gen)
    torch.testing.assert_close(qlinear(x, w, bias), F.linear(x, w.dequant(), bias))


def test_qparam_writes_fused_rows_and_refuses_split_blocks():
    gen = torch.Generator().manual_seed(6)
    p = QParam.empty("qkv", (64, H), WeightFormat.FP8_BLOCK, (16, 32))
    q, k = make(WeightFormat.FP8_BLOCK, (32, H), gen), make(WeightFormat.FP8_BLOCK, (32, H), gen)
    p.write((slice(0, 32),), q)
    p.write((slice(32, 64),), k)
    torch.testing.assert_close(p.q.dequant(), torch.cat((q.dequant(), k.dequant())))
    with pytest.raises(FormatError, match="whole blocks"):
        p.write((slice(8, 40),), k)
    with pytest.raises(FormatError, match="splits fp8 blocks"):
        permute_rows(q, torch.arange(32).flip(0))
    # per-tensor weights written into rows are held per channel: each row keeps its tensor's scale
    c = QParam.empty("w13", (E, 2 * INTER, H), WeightFormat.FP8_CHANNEL)
    gate, up = make(WeightFormat.FP8_TENSOR, (INTER, H), gen), make(WeightFormat.FP8_TENSOR, (INTER, H), gen)
    c.write((1, slice(0, INTER)), gate)
    c.write((1, slice(INTER, 2 * INTER)), up)
    torch.testing.assert_close(c.q[1].dequant(), torch.cat((gate.dequant(), up.dequant())))
    # a float tensor (--quantization fp8) is quantized per channel
    w = torch.randn(INTER, H, generator=gen)
    c.write((2, slice(0, INTER)), w)
    assert (c.q[2].dequant()[:INTER] - w).abs().max() <= 0.07 * w.abs().max()
    torch.testing.assert_close(c.q[2].dequant()[:INTER], quantize_fp8_channel(w).dequant())


def test_plan_refuses_quantized_weights_on_cuda_without_triton():
    from models.hf_config import load_config
    from models.kernels.plan import Capabilities, KernelPlanError, resolve_plan
    from server.config import BUNDLED_MODEL

    cfg = load_config(BUNDLED_MODEL)
    with pytest.raises(KernelPlanError, match="Triton is not installed"):
        resolve_plan(cfg, torch.device("cuda"), torch.bfloat16, caps=Capabilities("cuda", triton=False),
                     weight_formats={"layers.0.moe.w13": "fp8_block", "layers.0.moe.w2": "fp8_block"})
    plan = resolve_plan(cfg, torch.device("cuda"), torch.bfloat16, caps=Capabilities("cuda", triton=True),
                        weight_formats={"layers.0.moe.w13": "fp8_block", "layers.0.moe.w2": "fp8_block"})
    assert plan.layers[0].experts_format == "fp8_block" and plan.layers[0].moe.value == "triton"
    assert plan.layers[1].experts_format == "bf16"


def test_qparam_holds_int4_groups_with_zero_points():
    """The holder the int readers' weights go into (models/quant/int_readers.py): gate and up rows
    of one expert written apart, their zero points with them."""
    gen = torch.Generator().manual_seed(7)
    p = QParam.empty("w13", (E, 2 * INTER, H), WeightFormat.INT4_GROUP, group=32, zero=True,
                     scale_dtype=torch.float16)
    gate, up = make(WeightFormat.INT4_GROUP, (INTER, H), gen), make(WeightFormat.INT4_GROUP, (INTER, H), gen)
    p.write((3, slice(0, INTER)), gate)
    p.write((3, slice(INTER, 2 * INTER)), up)
    torch.testing.assert_close(p.q[3].dequant(), torch.cat((gate.dequant(), up.dequant())))
    assert p.q.nbytes == E * 2 * INTER * (H // 2 + 3 * H // 32)
