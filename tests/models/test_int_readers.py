"""INT4 / INT8 checkpoint readers (models/quant/int_readers.py, issue 27): each layout packed as its
tool packs it (GPTQ and AWQ from their documented bit layouts, compressed-tensors by its own
compressor) becomes a canonical QTensor whose float64 dequantization equals the format's own,
exactly; whole tiny checkpoints round trip through safetensors and config.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models import UnsupportedModelError, load_model
from models.hf_config import load_config
from models.loader import checkpoint_files
from models.quant import parse_quantization
from models.quant.formats import FormatError, WeightFormat
from models.quant.int_readers import INT_READERS, IntQuantConfig, int_reader, parse_int_quantization
from tests.models.conftest import make_checkpoint
from tests.quant_checkpoints import (
    AUTOAWQ_CONFIG,
    OPTIMUM_GPTQ_CONFIG,
    awq_config,
    awq_pack,
    ct_compress,
    ct_config,
    ct_decompress,
    ct_scheme,
    gptq_config,
    gptq_pack,
    int_dequant,
    int_quantize,
    quantizable,
    quantize_checkpoint,
)

N, K = 48, 128  # K divides into groups of 32, 64 and 128


def weight(seed: int = 0, n: int = N, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column: groups differ in range
    return w


def read(reader, prefix: str, tensors: dict[str, torch.Tensor]):
    """The reader's group over the named tensors, then its QTensor."""
    named = {f"{prefix}.{k}": v for k, v in tensors.items()}
    groups = reader.group(list(named) + [f"{prefix}.bias"])
    assert list(groups) == [f"{prefix}.weight"], groups
    assert f"{prefix}.bias" not in groups[f"{prefix}.weight"]
    return reader.assemble(f"{prefix}.weight", {n: named[n] for n in groups[f"{prefix}.weight"]})


# ------------------------------------------------------------------------------------------ GPTQ

@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_int4(group, sym, fmt):
    q, zero, scale = int_quantize(weight(1), 4, group, sym, zero_min=1 if fmt == "gptq" else 0)
    spec = parse_quantization(gptq_config(4, group, sym, fmt))
    assert spec is not None and spec.method == "gptq"
    qt = read(int_reader(spec), "model.layers.0.self_attn.q_proj", gptq_pack(q, zero, scale, 4, fmt))
    assert qt.fmt == WeightFormat.INT4_GROUP and qt.shape == (N, K)
    assert qt.group == (K if group == -1 else group)
    assert (qt.zero is None) == sym  # symmetric: the canonical zero point 8
    assert qt.scale.dtype == torch.float16 and qt.data.dtype == torch.uint8 and qt.data.shape == (N, K // 2)
    assert torch.equal(qt.dequant(torch.float64), int_dequant(q, zero, scale))


def test_gptq_v1_zero_is_stored_minus_one():
    """The same integers packed as v1 and as v2 differ in qzeros by one and read back equal; read
    with the other convention, they do not."""
    q, zero, scale = int_quantize(weight(2), 4, 32, sym=False, zero_min=1)
    v1, v2 = gptq_pack(q, zero, scale, 4, "gptq"), gptq_pack(q, zero, scale, 4, "gptq_v2")
    assert not torch.equal(v1["qzeros"], v2["qzeros"]) and torch.equal(v1["qweight"], v2["qweight"])
    r1 = int_reader(parse_int_quantization(gptq_config(4, 32, False, "gptq")))
    r2 = int_reader(parse_int_quantization(gptq_config(4, 32, False, "gptq_v2")))
    ref = int_dequant(q, zero, scale)
    assert torch.equal(read(r1, "a", v1).dequant(torch.float64), ref)
    assert torch.equal(read(r2, "a", v2).dequant(torch.float64), ref)
    assert not torch.equal(read(r2, "a", v1).dequant(torch.float64), ref)


def test_gptq_int8_channel():
    q, zero, scale = int_quantize(weight(3), 8, -1, sym=True)
    spec = parse_quantization(gptq_config(8, -1, True))
    qt = read(int_reader(spec), "m.down_proj", gptq_pack(q, zero, scale, 8))
    assert qt.fmt == WeightFormat.INT8_CHANNEL and qt.data.dtype == torch.int8 and qt.scale.shape == (N, 1)
    assert torch.equal(qt.dequant(torch.float64), int_dequant(q, zero, scale))


def test_gptq_desc_act_refused_by_name():
    """A reordered g_idx (desc_act) is refused naming desc_act; desc_act with a trivial g_idx loads."""
    q, zero, scale = int_quantize(weight(4), 4, 32, sym=True)
    packed = gptq_pack(q, zero, scale)
    cfg = {**gptq_config(4, 32, True), "desc_act": True}
    reader = int_reader(parse_int_quantization(cfg))
    assert torch.equal(read(reader, "x", packed).dequant(torch.float64), int_dequant(q, zero, scale))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match="desc_act"):
        read(reader, "x", {**packed, "g_idx": packed["g_idx"][perm]})


# ------------------------------------------------------------------------------------------- AWQ

@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_gemm(group):
    q, zero, scale = int_quantize(weight(5), 4, group, sym=False)
    spec = parse_quantization(awq_config(group))
    assert spec is not None and spec.method == "awq"
    packed = awq_pack(q, zero, scale)
    assert packed["qweight"].shape == (K, N // 8) and packed["qzeros"].shape == (K // group, N // 8)
    qt = read(int_reader(spec), "model.layers.0.mlp.experts.1.up_proj", packed)
    assert qt.fmt == WeightFormat.INT4_GROUP and qt.group == group and qt.zero is not None
    assert torch.equal(qt.dequant(torch.float64), int_dequant(q, zero, scale))


def test_awq_order_is_interleaved():
    """Reading AWQ's words in plain order (as GPTQ packs along N) gives a different weight: the
    interleave is what the reader undoes."""
    q, zero, scale = int_quantize(weight(6), 4, 32, sym=False)
    packed = awq_pack(q, zero, scale)
    qt = read(int_reader(parse_int_quantization(awq_config(32))), "w", packed)
    plain = torch.stack([(packed["qweight"].long() >> (4 * i)) & 15 for i in range(8)], -1).reshape(K, N).t()
    assert torch.equal(qt.dequant(torch.float64), int_dequant(q, zero, scale))
    assert not torch.equal(plain, q)


# --------------------------------------------------------------------------- compressed-tensors

CT_INT4 = [("group", 32), ("group", 64), ("group", 128), ("channel", None), ("tensor", None)]


@pytest.mark.parametrize("strategy, group", CT_INT4)
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_pack_quantized_int4(strategy, group, sym):
    scheme = ct_scheme(4, strategy, group, sym)
    spec = parse_quantization(ct_config(scheme, "pack-quantized", ["lm_head"]))
    assert spec is not None and spec.int_config is not None and spec.int_config.reader == "pack-quantized"
    w = weight(7).to(torch.bfloat16)
    packed = ct_compress(w, scheme, "pack-quantized")
    qt = read(int_reader(spec), "model.layers.1.mlp.experts.0.down_proj", packed)
    assert qt.fmt == WeightFormat.INT4_GROUP and qt.shape == (N, K)
    assert qt.group == (group or K) and (qt.zero is None) == sym
    assert torch.equal(qt.dequant(torch.float64), ct_decompress(packed, scheme, "pack-quantized"))


@pytest.mark.parametrize("fmt", ["pack-quantized", "int-quantized"])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_int8(fmt, strategy):
    scheme = ct_scheme(8, strategy, None, True)
    spec = parse_quantization(ct_config(scheme, fmt, []))
    w = weight(8).to(torch.bfloat16)
    packed = ct_compress(w, scheme, fmt)
    qt = read(int_reader(spec), "model.layers.0.self_attn.o_proj", packed)
    assert qt.fmt == WeightFormat.INT8_CHANNEL and qt.scale.dtype == torch.float32 and qt.scale.shape == (N, 1)
    assert torch.equal(qt.dequant(torch.float64), ct_decompress(packed, scheme, fmt))


def test_compressed_tensors_int4_in_int8_storage():
    """int-quantized int4 (one value per int8) reads as int4_group too."""
    scheme = ct_scheme(4, "group", 32, False)
    spec = parse_quantization(ct_config(scheme, "int-quantized", []))
    packed = ct_compress(weight(9).to(torch.bfloat16), scheme, "int-quantized")
    qt = read(int_reader(spec), "p", packed)
    assert qt.fmt == WeightFormat.INT4_GROUP and qt.zero is not None
    assert torch.equal(qt.dequant(torch.float64), ct_decompress(packed, scheme, "int-quantized"))


def test_compressed_tensors_actorder_g_idx_refused():
    scheme = ct_scheme(4, "group", 32, True)
    reader = int_reader(parse_quantization(ct_config(scheme, "pack-quantized", [])))
    packed = ct_compress(weight(10).to(torch.bfloat16), scheme)
    trivial = (torch.arange(K) // 32).to(torch.int32)
    assert torch.equal(read(reader, "p", {**packed, "weight_g_idx": trivial}).dequant(torch.float64),
                       ct_decompress(packed, scheme))
    with pytest.raises(UnsupportedModelError, match="desc_act"):
        read(reader, "p", {**packed, "weight_g_idx": trivial.flip(0)})


# ------------------------------------------------------------------------------- refused configs

@pytest.mark.parametrize("qcfg, named", [
    (gptq_config(3, 128, True), "gptq bits 3"),
    (gptq_config(2, 128, True), "gptq bits 2"),
    (gptq_config(8, 128, True), "8-bit with group_size 128"),
    ({**gptq_config(4, 128, True), "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({**awq_config(128), "version": "gemv"}, "awq version 'gemv'"),
    ({**awq_config(128), "bits": 8}, "awq bits 8"),
    ({**awq_config(128), "zero_point": False}, "zero_point"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "without config_groups"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 128,
                                           "symmetric": True}}}}, "int8 weights with strategy 'group'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 2, "type": "int", "strategy": "group", "group_size": 128}}}},
     "int2"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}}}},
     "static input activation"),
])
def test_unsupported_int_variants_named(qcfg, named):
    with pytest.raises(UnsupportedModelError, match=named):
        parse_quantization(qcfg)


def test_shapes_that_do_not_fit_are_named():
    q, zero, scale = int_quantize(weight(11), 4, 32, sym=False)
    packed = gptq_pack(q, zero, scale)
    reader = int_reader(parse_int_quantization(gptq_config(4, 32, False)))
    with pytest.raises(FormatError, match="do not fit"):
        read(reader, "bad", {**packed, "scales": packed["scales"][:, :-1]})
    with pytest.raises(FormatError, match="not group_size 64"):
        read(int_reader(parse_int_quantization(gptq_config(4, 64, False))), "bad", packed)
    with pytest.raises(FormatError, match="not group_size -1"):
        read(int_reader(parse_int_quantization(gptq_config(4, -1, False))), "bad", packed)
    with pytest.raises(FormatError, match="not group_size 64"):
        read(int_reader(parse_int_quantization(awq_config(64))), "bad", awq_pack(q, zero, scale))
    with pytest.raises(FormatError, match="missing"):
        reader.group(["bad.qweight", "bad.scales"])


def test_registry_names_every_reader():
    assert set(INT_READERS) == {"gptq", "awq", "pack-quantized", "int-quantized"}
    for key, cls in INT_READERS.items():
        cfg = IntQuantConfig("x", key, (4,))
        assert isinstance(int_reader(cfg), cls)


# ------------------------------------------------------------------- tiny checkpoints on disk

CHECKPOINTS = [
    ("gptq", dict(bits=4, group_size=32, sym=True)),
    ("gptq", dict(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")),
    ("awq", dict(group_size=32)),
    ("compressed-tensors", dict(bits=4, group_size=32, sym=False)),
    ("compressed-tensors", dict(bits=8, strategy="channel", ct_format="int-quantized")),
]


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    make_checkpoint("mixtral", path, num_hidden_layers=2)
    return path


@pytest.mark.parametrize("method, kw", CHECKPOINTS, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}{v}" for k, v in v.items()))
def test_checkpoint_round_trip(method, kw, tiny_mixtral, tmp_path):
    """A tiny Mixtral quantized to disk (safetensors + config.json as the tools write them) reads back:
    config.json parses to the method's reader, whose groups are exactly the attention and expert
    linears, each dequantizing to the reference; every other tensor stays plain. The loader names
    the method it does not load yet."""
    reference = quantize_checkpoint(tiny_mixtral, tmp_path, method, **kw)
    cfg = load_config(str(tmp_path))
    spec = cfg.extra["quant"]
    assert spec.method == method and spec.int_config is not None
    reader = int_reader(spec)
    tensors: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(str(tmp_path)):
        with safe_open(f, framework="pt") as h:
            tensors.update({n: h.get_tensor(n) for n in h.keys()})
    groups = reader.group(list(tensors))
    expected = {n for n, t in reference.items() if quantizable(n, t)}
    assert set(groups) == expected and len(expected) == 2 * (4 + 8 * 3)  # 2 layers: q/k/v/o + 8 experts x 3
    members = {m for g in groups.values() for m in g}
    assert set(tensors) - members == set(reference) - expected  # routers, norms, embeddings, lm_head
    want_fmt = WeightFormat.INT8_CHANNEL if kw.get("bits") == 8 else WeightFormat.INT4_GROUP
    for name, parts in groups.items():
        qt = reader.assemble(name, {p: tensors[p] for p in parts})
        assert qt.fmt == want_fmt and qt.shape == tuple(reference[name].shape), name
        assert torch.equal(qt.dequant(torch.float32), reference[name]), name
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == method
    model = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)  # kept in its format
    assert set(model.weight_formats().values()) == {want_fmt.value}


def test_compressed_tensors_stacked_experts():
    """A fused expert tensor [E, N, K] (leading dims) reads as a stacked QTensor, each expert's
    slice dequantizing as compressed-tensors decompresses it."""
    scheme = ct_scheme(4, "group", 32, False)
    reader = int_reader(parse_quantization(ct_config(scheme, "pack-quantized", [])))
    per = [ct_compress(weight(20 + e).to(torch.bfloat16), scheme) for e in range(3)]
    stacked = {k: torch.stack([p[k] for p in per]) for k in ("weight_packed", "weight_scale", "weight_zero_point")}
    stacked["weight_shape"] = torch.tensor([3, N, K])
    qt = read(reader, "model.layers.0.mlp.experts.gate_up_proj", stacked)
    assert qt.shape == (3, N, K) and qt.data.shape == (3, N, K // 2) and qt.zero is not None
    for e in range(3):
        assert torch.equal(qt[e].dequant(torch.float64), ct_decompress(per[e], scheme))


def test_older_writers_configs():
    """optimum's GPTQ config (no format: v1 zeros) and AutoAWQ's (w_bit, q_group_size, "GEMM")."""
    q, zero, scale = int_quantize(weight(30), 4, 32, sym=True)
    reader = int_reader(parse_quantization(OPTIMUM_GPTQ_CONFIG))
    assert torch.equal(read(reader, "a", gptq_pack(q, zero, scale, 4, "gptq")).dequant(torch.float64),
                       int_dequant(q, zero, scale))
    q, zero, scale = int_quantize(weight(31), 4, 32, sym=False)
    reader = int_reader(parse_quantization(AUTOAWQ_CONFIG))
    assert torch.equal(read(reader, "a", awq_pack(q, zero, scale)).dequant(torch.float64), int_dequant(q, zero, scale))
