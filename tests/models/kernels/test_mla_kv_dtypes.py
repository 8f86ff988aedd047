"""MLA's latent cache in bfloat16 and fp8 (`--kv-cache-dtype bfloat16 | fp8` on a float32 model):
the C and Triton MLA decode kernels over such a cache against the un-absorbed float64 math over
the same (rounded / quantized) cache contents; and a DeepSeek tiny model with the flag: no
refusal, the C kernel equal to the layer's PyTorch path over the same cache, logits close to the
float32 cache's, the cache's bytes halved / quartered."""

from __future__ import annotations

import pytest
import torch

from models import load_model
from models.kernels import cpu_ops
from models.kernels.flags import KernelFlags
from models.kernels.mla_decode import absorbed_weights, mla_decode
from models.kv_cache_dtype import configure_kv_cache
from models.layers.paged import quantize_fp8
from tests.models.kernels.conftest import DEVICES, rel_err
from tests.models.kernels.test_mla_decode import CASES, IDS, make_case, unabsorbed

K_SCALE = 0.05  # not 1.0: a kernel that ignored the scale would fail (values |x| <= ~4 -> up to 80 in fp8)


def stored(c, kind):
    """The case's caches as a `kind` cache holds them, and the float64-exact values they mean."""
    if kind == "bfloat16":
        lat, pe = c["lat"].bfloat16(), c["pe"].bfloat16()
        return lat, pe, 1.0, {**c, "lat": lat.double(), "pe": pe.double()}
    lat, pe = quantize_fp8(c["lat"], K_SCALE), quantize_fp8(c["pe"], K_SCALE)
    return lat, pe, K_SCALE, {**c, "lat": lat.double() * K_SCALE, "pe": pe.double() * K_SCALE}


def check(case, kind, kernel, device="cpu"):
    B, H, r, dr, dn, dv, bs, max_len, extra = case
    c = make_case(B, H, r, dr, dn, dv, bs, max_len, extra, device=device, zero_rows=(B - 1,) if B > 1 else ())
    lat, pe, ks, exact = stored(c, kind)
    scale = (dn + dr) ** -0.5
    w_uk, w_uv_t = absorbed_weights(c["kv_b"], H, dn, dv)
    out = mla_decode(c["q_nope"], c["q_pe"], w_uk, w_uv_t, lat, pe, c["tables"], c["lens"], scale, kernel, ks)
    assert out.dtype == torch.float32
    ref = unabsorbed(exact, dn, dv, scale)
    assert rel_err(out.cpu(), ref) < 2e-5
    if B > 1:
        assert out[B - 1].abs().max() == 0  # a zero-length row: zeros


@pytest.mark.parametrize("kind", ["bfloat16", "fp8"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cpu_mla_kernel_reads_bf16_and_fp8(case, kind):
    assert cpu_ops.load() is not None
    check(case, kind, "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bfloat16", "fp8"])
def test_triton_mla_kernel_reads_bf16_and_fp8(kind, device):
    check(CASES[1], kind, "triton", device)


def test_cpu_mla_op_refuses_mixed_caches():
    assert cpu_ops.load() is not None
    c = make_case(*CASES[2][:8])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float8_e4m3fn"):
        torch.ops.moe_serve.mla_decode_cpu(c["q_nope"][..., :48].contiguous(), c["q_pe"].contiguous(),
                                           c["lat"].bfloat16(), c["pe"], c["tables"], c["lens"], 0.1)


def test_deepseek_tiny_with_a_quantized_latent_cache(tmp_path):
    """No refusal; the C kernel and the PyTorch path agree over the same cache (decodes, short and
    long chunked-prefill continuations); logits close to the float32 cache's; bytes per block
    halved (bf16) / quartered (fp8). Every expert routed (top-8 of 8): the tiny random router
    would otherwise turn the cache's rounding into expert flips, whole units of logit."""
    from tests.models.conftest import make_checkpoint
    from tests.models.test_mla_kernels import schedule

    make_checkpoint("deepseek_v3", tmp_path, num_experts_per_tok=8, n_group=1, topk_group=1)
    model = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    f32_bytes = model.kv_bytes_per_block(16)
    base = schedule(model, KernelFlags(attention="cpu"))
    # measured: max error 0.004 (bfloat16), 0.054 (fp8) of the largest logit
    for kind, factor, bound in (("bfloat16", 2, 0.01), ("fp8", 4, 0.1)):
        dtype = configure_kv_cache(model, kind)
        assert model.allocate_kv_cache(2, 4)[0][0].dtype == dtype
        assert model.kv_bytes_per_block(16) * factor == f32_bytes
        ref = schedule(model, KernelFlags(attention="reference"))
        got = schedule(model, KernelFlags(attention="cpu"))
        for step, (g, r, b) in enumerate(zip(got, ref, base)):
            err = ((g - b).abs().max() / b.abs().max()).item()
            assert 0 < err < bound, (kind, step, err)  # > 0: the cache did round
            # the two paths over the cache they wrote: equal to float32 rounding, but for a value whose
            # rounding flips where the two paths' float32 sums differ (measured 1.3e-4, bfloat16 step 2)
            same = ((g - r).abs().max() / r.abs().max()).item()
            assert same < max(2e-5, err / 5), (kind, step, same, err)


def test_dsa_indexer_reads_the_quantized_index_keys(family_checkpoint):
    """DeepSeek-V3.2's index keys share the rotary row: the indexer's choice over an fp8 cache
    (k_scale 0.05) equals its choice over a float32 cache holding the dequantized values, for
    decodes and for a chunk after a cached prefix."""
    from models.layers.paged import AttentionMetadata

    path, _ = family_checkpoint("deepseek_v32")
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    ix = next(layer.attn.indexer for layer in model.layers if hasattr(layer.attn, "indexer"))
    ix.topk = 5  # fewer than the contexts: the choice matters
    g = torch.Generator().manual_seed(0)
    bs, nblocks, width = 4, 12, model.layers[0].attn.rope + ix.head_dim
    pe = torch.randn(nblocks, bs, 1, width, generator=g)
    pe8 = quantize_fp8(pe, K_SCALE)
    lat = torch.zeros(nblocks, bs, 1, 32)
    tables = torch.randperm(nblocks, generator=g).view(3, 4)
    lens = [13, 9, 16]  # two decodes, then a chunk of 3 queries after 13 cached tokens
    meta = AttentionMetadata(num_decodes=2, query_start_loc=[0, 1, 2, 5], seq_lens=lens,
                             slot_mapping=torch.zeros(5, dtype=torch.long), block_tables=tables,
                             decode_seq_lens=torch.tensor(lens[:2]))
    q = torch.randn(5, ix.n_heads, ix.head_dim, generator=g)
    w = torch.randn(5, ix.n_heads, generator=g)
    k_new = torch.randn(5, ix.head_dim, generator=g)
    got = ix.select(q, w, k_new, (lat.to(pe8.dtype), pe8), meta, K_SCALE)
    want = ix.select(q, w, k_new, (lat, pe8.float() * K_SCALE), meta)
    assert torch.equal(got[0], want[0]) and len(got[1]) == 1 and torch.equal(got[1][0], want[1][0])
    assert got[0].sum(-1).tolist() == [5, 5]
    # (a positive scale on every key keeps the choice; the bytes misread as integers change it)
    wrong = ix.select(q, w, k_new, (lat, pe8.view(torch.uint8).float()), meta)
    assert not torch.equal(wrong[0], want[0]) or not torch.equal(wrong[1][0], want[1][0])
