"""Quantized checkpoints: tiny random models quantized with each format's own block layout load
with their quantized weights kept in their format (QTensors: the engine's resident expert and
linear weights within 1.05x the checkpoint's quantized bytes), to logits within 1e-4 of
transformers running the dequantized weights and the same greedy continuations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

import models.loader as loader
from models import UnsupportedModelError, load_model
from models.registry import family_for
from tests.models.simple_runner import greedy_generate, prefill_logits
from tests.models.conftest import make_checkpoint
from tests.models.test_parity import PROMPTS, hf_padded_logits

E4M3_MAX = 448.0


def quantizable(name: str, t: torch.Tensor) -> bool:
    """The linear weights FP8 releases quantize: attention and MLP/expert projections (not the
    router, norms, embeddings or lm_head)."""
    return (t.dim() == 2 and name.endswith(".weight") and (".self_attn." in name or ".mlp." in name
            or ".block_sparse_moe." in name) and "norm" not in name and not name.endswith((".gate.weight", "router.weight")))


def fp8_tiles(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per [bn, bk] tile (the last ones partial): (fp8 weight, scale [ceil(out/bn), ceil(in/bk)],
    the dequantized weight the reference runs), tile by tile."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // bn), -(-in_dim // bk)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    deq = torch.empty_like(w)
    for r in range(rows):
        for c in range(cols):
            tile = w[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk]
            s = tile.abs().max().clamp(min=1e-12) / E4M3_MAX
            qt = (tile / s).to(torch.float8_e4m3fn)
            q[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] = qt
            scale[r, c] = s
            deq[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] = qt.float() * s
    return q, scale, deq


def rewrite(path, quantize, qcfg: dict) -> dict[str, torch.Tensor]:
    """Quantize a saved checkpoint in place; returns the dequantized checkpoint for the reference."""
    tensors = load_file(str(path / "model.safetensors"))
    (path / "config.unquantized.json").write_text((path / "config.json").read_text())
    out, reference = {}, {}
    for name, t in tensors.items():
        reference[name] = t
        if quantizable(name, t):
            extra, reference[name] = quantize(name, t)
            out.update(extra)
        else:
            out[name] = t
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(cfg))
    return reference


QUANTIZED_SUFFIXES = ("_blocks", "_scales", ".weight_scale", ".weight_scale_inv")


def checkpoint_quantized(path) -> tuple[set[str], int]:
    """(the names an unquantized checkpoint gives the quantized weights, the bytes of their
    quantized tensors and weight scales as stored)."""
    names, total = set(), 0
    for name, t in load_file(str(path / "model.safetensors")).items():
        if t.dtype == torch.float8_e4m3fn or name.endswith(QUANTIZED_SUFFIXES):
            total += t.numel() * t.element_size()
            if t.dtype == torch.float8_e4m3fn or name.endswith("_blocks"):
                names.add(name.removesuffix("_blocks"))
    return names, total


def assert_matches_dequantized(path, ref, reference: dict[str, torch.Tensor], formats: set[str] | None = None,
                               greedy: bool = True) -> None:
    """Our model loading the quantized checkpoint vs transformers loading the dequantized one;
    every quantized weight kept in its format (`formats`: the WeightFormats the engine holds)."""
    deq = path / "dequantized"
    deq.mkdir()
    save_file(reference, str(deq / "model.safetensors"), metadata={"format": "pt"})
    (deq / "config.json").write_text((path / "config.unquantized.json").read_text())
    ref = type(ref).from_pretrained(str(deq), dtype=torch.float32).eval()
    model = load_model(str(path), dtype="float32", device="cpu", progress=False)
    if formats is not None:
        names, ckpt_bytes = checkpoint_quantized(path)
        weight_map = family_for(model.config.architecture).weight_map(model.config)
        held = {weight_map[n][0] for n in names}
        assert held <= set(model.qweights), f"dequantized at load: {sorted(held - set(model.qweights))}"
        assert set(model.weight_formats().values()) == formats
        sparse = [i for i in range(model.config.num_layers) if model.config.sparse_layers[i]]
        assert all(f"layers.{i}.moe.{w}" in model.qweights for i in sparse for w in ("w13", "w2"))
        plan = model.kernel_plan.to_dict()
        assert {f for g in plan["layers"] for v in g["weight_formats"].values() if v for f in v.split("+")} >= formats
        resident = model.weight_bytes()
        assert plan["quantized_bytes"] == resident["quantized"] and plan["weight_bytes"] == resident["total"]
        assert resident["quantized"] <= 1.05 * ckpt_bytes, (resident["quantized"], ckpt_bytes)
        assert not any(p.device.type != "meta" for n, p in model.named_parameters() if n in model.qweights)
    ours = prefill_logits(model, PROMPTS)
    out = hf_padded_logits(ref, PROMPTS)
    for i, p in enumerate(PROMPTS):
        diff = (ours[i] - out.logits[i, : len(p)]).abs().max().item()
        assert diff <= 1e-4, f"prompt {i}: max abs logit diff {diff}"
    if greedy:  # against our float path on the dequantized checkpoint (its logits match transformers': test_parity)
        dequantized = load_model(str(deq), dtype="float32", device="cpu", progress=False)
        prompts = PROMPTS[1:3]
        assert greedy_generate(model, prompts, 6) == greedy_generate(dequantized, prompts, 6)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_fp8_block_checkpoint(family, tmp_path):
    """DeepSeek-V3 / Qwen3 FP8 layout: float8_e4m3 weights, float32 `weight_scale_inv` per tile."""
    ref = make_checkpoint(family, tmp_path, seed=5)

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 16, 16)
        return {name: q, name + "_scale_inv": scale}, deq

    reference = rewrite(tmp_path, quantize, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [16, 16]})
    assert any(t.dtype == torch.float8_e4m3fn for t in load_file(str(tmp_path / "model.safetensors")).values())
    assert_matches_dequantized(tmp_path, ref, reference, {"fp8_block"})


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_compressed_tensors_fp8_checkpoint(strategy, tmp_path):
    """compressed-tensors float-quantized, its weights made by the package's own compressor
    (`FloatQuantizationCompressor`: rounding and layout) and the reference by its decompressor."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    ref = make_checkpoint("mixtral", tmp_path, seed=6)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False,
        block_structure=[32, 32] if strategy == "block" else None))

    def quantize(name, w):
        if strategy == "block":
            _, scale, _ = fp8_tiles(w, 32, 32)
        else:
            amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().max().reshape(1)
            scale = amax.clamp(min=1e-12) / E4M3_MAX  # [out, 1] or [1]
        out = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        deq = FloatQuantizationCompressor.decompress(dict(out), scheme)["weight"].float()
        # a static activation scale too: unused when computing in the model dtype
        return {name: out["weight"], name + "_scale": out["weight_scale"],
                name.removesuffix("weight") + "input_scale": torch.ones(1)}, deq

    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": strategy,
                                                "symmetric": True, "dynamic": False},
             "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}
    if strategy == "block":
        group["weights"]["block_structure"] = [32, 32]
    reference = rewrite(tmp_path, quantize, {"quant_method": "compressed-tensors", "format": "float-quantized",
                                             "config_groups": {"group_0": group}, "ignore": ["lm_head"]})
    # per tensor: fused q/k/v and each expert's gate+up keep their tensors' scales per row
    formats = {"block": {"fp8_block"}, "channel": {"fp8_channel"}, "tensor": {"fp8_tensor", "fp8_channel"}}[strategy]
    assert_matches_dequantized(tmp_path, ref, reference, formats)
    if strategy == "channel":  # load_model(keep_quantized=False): dequantized at load, the same logits
        kept = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
        placed = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False, keep_quantized=False)
        assert kept.qweights and not placed.qweights and placed.weight_bytes()["quantized"] == 0
        for a, b in zip(prefill_logits(kept, PROMPTS), prefill_logits(placed, PROMPTS)):
            assert (a - b).abs().max().item() <= 1e-4


FP4 = torch.tensor(FP4_VALUES)


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] -> (blocks [..., rows, cols/32, 16] uint8, scales [..., rows, cols/32] uint8):
    per 32 values a power-of-two scale (E8M0) with amax / scale <= 6, values rounded to E2M1."""
    blocks32 = w.reshape(*w.shape[:-1], -1, 32)  # [..., rows, G, 32]
    amax = blocks32.abs().amax(-1).clamp(min=2.0**-100)
    exp = torch.ceil(torch.log2(amax / 6.0))  # [..., rows, G]
    scaled = blocks32 / torch.exp2(exp)[..., None]
    codes = (scaled[..., None] - FP4).abs().argmin(-1)  # nearest E2M1 code, sign included
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble first
    return packed, (exp + 127).to(torch.uint8)


def test_mxfp4_gpt_oss_checkpoint(tmp_path):
    """gpt-oss experts as `*_blocks` / `*_scales`; the reference is transformers' own MXFP4 dequantization."""
    ref = make_checkpoint("gpt_oss", tmp_path, seed=7)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    reference = dict(tensors)
    (tmp_path / "config.unquantized.json").write_text((tmp_path / "config.json").read_text())
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name)  # [E, H, 2I] / [E, I, H]: the format blocks the transposed rows
        blocks, scales = mxfp4_pack(w.transpose(1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert reference[name].shape == w.shape and (reference[name] - w).abs().max() < 0.5 * w.abs().max()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_matches_dequantized(tmp_path, ref, reference, {"mxfp4"})


@pytest.mark.parametrize("qcfg, named", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq version 'gemv'"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq bits 3"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "pack-quantized without config_groups"),
    ({"quant_method": "fp8", "fmt": "e4m3"}, "weight_block_size"),
])
def test_unsupported_quantization_named(qcfg, named, tmp_path):
    make_checkpoint("mixtral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=named):
        load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)


def test_quantized_weights_stream_one_at_a_time(tmp_path, monkeypatch):
    """Each dequantized weight is produced after reading just it and its scale: nothing is
    read ahead, so host memory beyond the model holds one tensor at a time."""
    make_checkpoint("deepseek_v3", tmp_path, seed=5)

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 16, 16)
        return {name: q, name + "_scale_inv": scale}, deq

    rewrite(tmp_path, quantize, {"quant_method": "fp8", "weight_block_size": [16, 16]})
    reads: list[str] = []
    real_open = loader.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", Counting)
    from models.quant import QuantSpec

    yielded = 0
    for name, tensor in loader.iter_tensors(str(tmp_path), progress=False, quant=QuantSpec("fp8", (16, 16))):
        yielded += 1
        assert tensor.dtype == torch.float32
        assert reads[-1] in (name, name + "_scale_inv") and len(reads) <= 2 * yielded
    assert yielded and sum(n.endswith("_scale_inv") for n in reads) > 10


def test_quantization_fp8_quantizes_a_float_checkpoint_per_channel(mixtral_dir):
    """--quantization fp8: every expert stack and linear kept as fp8_channel (a quarter of their
    float32 bytes, plus a scale per row), computing what the float model computes with those weights."""
    model = load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False, quantization="fp8")
    assert set(model.qweights) == set(model.qtensor_candidates())
    assert set(model.weight_formats().values()) == {"fp8_channel"}
    ref = load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)
    assert model.weight_bytes()["experts_linears"] <= 0.27 * ref.weight_bytes()["experts_linears"]
    with torch.no_grad():
        for name, q in model.qweights.items():
            ref.get_parameter(name).copy_(q.dequant())
    ref.plan_kernels()
    for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS)):
        assert (a - b).abs().max().item() <= 1e-4
    assert greedy_generate(model, PROMPTS[1:3], 6) == greedy_generate(ref, PROMPTS[1:3], 6)
    assert model.kernel_plan.lm_head_format == "fp8_channel" and "fp8_channel" in model.kernel_plan.table()


def test_quantization_fp8_refuses_unknown_names(mixtral_dir):
    with pytest.raises(UnsupportedModelError, match="fp8"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False, quantization="fp4")


def test_fused_rows_that_split_fp8_blocks_fall_back_to_float_by_name(tmp_path, caplog):
    """Blocks of 48 rows: q (64 rows) ends inside a block that k would share, so the fused q/k/v
    is dequantized at load and named in the log; gate/up (96 rows each) and the rest stay fp8_block."""
    ref = make_checkpoint("mixtral", tmp_path, seed=8)

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 48, 32)
        return {name: q, name + "_scale": scale}, deq

    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                                "block_structure": [48, 32], "symmetric": True, "dynamic": False}}
    reference = rewrite(tmp_path, quantize, {"quant_method": "compressed-tensors", "format": "float-quantized",
                                             "config_groups": {"group_0": group}, "ignore": ["lm_head"]})
    deq = tmp_path / "dequantized"
    deq.mkdir()
    save_file(reference, str(deq / "model.safetensors"), metadata={"format": "pt"})
    (deq / "config.json").write_text((tmp_path / "config.unquantized.json").read_text())
    ref = type(ref).from_pretrained(str(deq), dtype=torch.float32).eval()
    with caplog.at_level("INFO", logger="models"):
        model = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    n = model.config.num_layers
    assert not any(f"layers.{i}.attn.qkv.weight" in model.qweights for i in range(n))
    assert all(f"layers.{i}.{w}" in model.qweights for i in range(n) for w in ("attn.o_proj.weight", "moe.w13",
                                                                             "moe.w2"))
    assert "layers.0.attn.qkv.weight (model.layers.0.self_attn.q_proj.weight fills rows 0:64, not whole fp8 " \
           "blocks of 48)" in caplog.text
    assert "model.layers.0.self_attn.k_proj.weight" in caplog.text  # dequantized at load, by name
    assert model.kernel_plan.to_dict()["layers"][0]["weight_formats"]["attention"] == "fp8_block"  # o
    out = hf_padded_logits(ref, PROMPTS)
    for i, (p, ours) in enumerate(zip(PROMPTS, prefill_logits(model, PROMPTS))):
        assert (ours - out.logits[i, : len(p)]).abs().max().item() <= 1e-4


def _cuda_vs_dequantized(path, reference: dict[str, torch.Tensor], formats: set[str]) -> None:
    """On the GPU: the quantized checkpoint (its weights kept in their format, run by the Triton
    kernels of models/kernels/triton_qmoe.py) against the dequantized one in the same dtype.
    FP8 block runs W8A8 (activations quantized per token group), so this compares the logits'
    direction and the top-1 tokens, not 1e-4."""
    deq = path / "dequantized"
    deq.mkdir()
    save_file(reference, str(deq / "model.safetensors"), metadata={"format": "pt"})
    (deq / "config.json").write_text((path / "config.unquantized.json").read_text())
    model = load_model(str(path), dtype="bfloat16", device="cuda", progress=False)
    assert set(model.weight_formats().values()) == formats
    assert all(q.q.data.device.type == "cuda" for q in model.qweights.values())
    dense = load_model(str(deq), dtype="bfloat16", device="cuda", progress=False)
    ours, theirs = prefill_logits(model, PROMPTS), prefill_logits(dense, PROMPTS)
    agree = total = 0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        a, b = a.float(), b.float()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
        assert cos >= 0.98, f"prompt {i}: logits cosine {cos}"
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    assert agree >= 0.8 * total, f"top-1 agreement {agree}/{total}"
    out = greedy_generate(model, PROMPTS[1:3], 6)
    assert all(len(o) == 6 for o in out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_quantized_checkpoints_run_the_triton_kernels(tmp_path):
    """FP8 block (DeepSeek-V3 layout, MLA), MXFP4 (gpt-oss, biased clamped experts) and GPTQ int4
    (Mixtral) checkpoints on the GPU, kept quantized, against their dequantized weights."""
    from tests.quant_checkpoints import quantize_checkpoint, write_dequantized

    fp8 = tmp_path / "fp8"
    make_checkpoint("deepseek_v3", fp8, seed=5)

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 16, 16)
        return {name: q, name + "_scale_inv": scale}, deq

    reference = rewrite(fp8, quantize, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [16, 16]})
    _cuda_vs_dequantized(fp8, reference, {"fp8_block"})

    mx = tmp_path / "mxfp4"
    make_checkpoint("gpt_oss", mx, seed=7)
    tensors = load_file(str(mx / "model.safetensors"))
    reference = dict(tensors)
    (mx / "config.unquantized.json").write_text((mx / "config.json").read_text())
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_pack(tensors.pop(name).transpose(1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    save_file(tensors, str(mx / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (mx / "config.json").write_text(json.dumps(cfg))
    _cuda_vs_dequantized(mx, reference, {"mxfp4"})

    src, gptq, deq = tmp_path / "src", tmp_path / "gptq", tmp_path / "gptq-deq"
    make_checkpoint("mixtral", src, num_hidden_layers=2)
    ref = quantize_checkpoint(src, gptq, "gptq", bits=4, group_size=32, sym=True)
    write_dequantized(src, deq, ref)
    model = load_model(str(gptq), dtype="bfloat16", device="cuda", progress=False)
    dense = load_model(str(deq), dtype="bfloat16", device="cuda", progress=False)
    assert set(model.weight_formats().values()) == {"int4_group"}
    for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(dense, PROMPTS), strict=True):
        assert torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item() >= 0.99


def test_the_triton_path_through_the_engine_matches_the_reference(tmp_path, monkeypatch):
    """The CUDA path of kept weights on the CPU: `--moe-backend triton` runs models.kernels.triton_qmoe
    (under TRITON_INTERPRET=1) for every kept linear and expert stack. FP8 block (DeepSeek-V3: MLA's
    projections too; W8A16 here, the W8A8 kernels have their own tests), gpt-oss MXFP4 (biases,
    clamped SwiGLU) and GPTQ int4 with zero points: the same logits as the torch reference path."""
    import models.kernels.triton_qmoe as triton_qmoe
    from models.kernels.flags import KernelFlags
    from tests.quant_checkpoints import quantize_checkpoint

    monkeypatch.setattr(triton_qmoe, "fp8_dot_supported", lambda device: False)  # W8A16: exact vs the reference
    fp8 = tmp_path / "fp8"
    make_checkpoint("deepseek_v3", fp8, seed=5)

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 16, 16)
        return {name: q, name + "_scale_inv": scale}, deq

    rewrite(fp8, quantize, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [16, 16]})
    mx = tmp_path / "mxfp4"
    make_checkpoint("gpt_oss", mx, seed=7)
    tensors = load_file(str(mx / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_pack(tensors.pop(name).transpose(1, 2))
    save_file(tensors, str(mx / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mx / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (mx / "config.json").write_text(json.dumps(cfg))
    src, gptq = tmp_path / "src", tmp_path / "gptq"
    make_checkpoint("mixtral", src, num_hidden_layers=2)
    quantize_checkpoint(src, gptq, "gptq", bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")
    prompts = PROMPTS[:2]
    for path, fmt in ((fp8, "fp8_block"), (mx, "mxfp4"), (gptq, "int4_group")):
        ref = load_model(str(path), dtype="float32", device="cpu", progress=False)
        tri = load_model(str(path), dtype="float32", device="cpu", progress=False, kernels=KernelFlags(moe="triton"))
        assert set(tri.weight_formats().values()) == {fmt}
        moe_kernels = {lk.moe for lk in tri.kernel_plan.layers if lk.moe is not None and fmt in (lk.experts_format or "")}
        assert moe_kernels == {"triton"}, (path.name, moe_kernels)
        a, b = torch.cat(prefill_logits(ref, prompts)), torch.cat(prefill_logits(tri, prompts))
        assert ((a - b).norm() / a.norm()).item() < 1e-5, path.name
