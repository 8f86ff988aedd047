"""GGUF block types beyond Q8_0 / Q4_0 / Q4_1 (models/gguf_loader.py), against the `gguf`
package's own dequantization (gguf.quants) as the reference:

- Q4_K re-packed as `int4_zp` groups of 32 (d*sc and -dmin*mn rounded to float16 once): every
  weight within the stated bound of the reference, the resident bytes 0.625 per weight;
- Q6_K dequantized and re-quantized to `int8` groups of 32 (no exact mapping): the error measured
  against the reference stays within int8's half step;
- MXFP4: exactly, as int8 groups of 32 in a packed group (Mixtral's experts here), as float
  elsewhere (gpt-oss's experts, kept as mxfp4 QTensors: test_gguf_families.py);
- F16 / BF16 tensors: loaded bit-exactly (the logits equal the float32 file's).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from models import load_model
from models.gguf_loader import GGUFCheckpoint, GGUFFile
from models.kernels.quant import GROUP
from tests.conftest import BUNDLED
from tests.models.conftest import make_checkpoint
from tests.models.gguf_files import Q, dequantized_state_dict, q4_k_blocks, q6_k_blocks, write_gguf
from tests.models.simple_runner import prefill_logits
from tests.models.test_gguf import PROMPTS, SIZES, float_reference, needs_kernels, rel_err

# K-quants need rows of 256: hidden 256 lets every weight be Q4_K
K_SIZES = {**SIZES, "hidden_size": 256, "intermediate_size": 256, "num_local_experts": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2}


def fp16_rounding(x: torch.Tensor) -> torch.Tensor:
    """The most float16 round-to-nearest moves a value of magnitude |x|: 2^-11 |x|, 2^-25 below
    the normal range."""
    return torch.maximum(x.float().abs() * 2.0**-11, torch.tensor(2.0**-25))


def test_q4_k_repack_bound(tmp_path, monkeypatch):
    """Q4_K blocks (random bytes, valid scales) -> int4_zp: within 15 |dd| + |dm| of gguf's
    dequantization per weight, where dd, dm are float16's rounding of d*sc and dmin*mn
    (converted a few super-blocks at a time, as a large tensor is)."""
    monkeypatch.setattr("models.gguf_loader._CHUNK", 5)
    t = np.random.default_rng(0).standard_normal((3, 8, 512)).astype(np.float32) * 0.05
    blocks = q4_k_blocks(t)
    ref = torch.from_numpy(dequantize(blocks, Q.Q4_K).reshape(t.shape))
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("w", blocks, raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = object.__new__(GGUFCheckpoint)
    ck.path, ck.tensors = str(path), GGUFFile(str(path)).tensors
    q, d, m = ck._q4_k("w")
    assert q.shape == (3, 8, 256) and d.shape == m.shape == (3, 8, 512 // GROUP)
    from models.kernels.quant import dequantize as ours

    got = ours(q, d, m, "int4_zp")
    bound = (15 * fp16_rounding(d) + fp16_rounding(m)).repeat_interleave(GROUP, dim=-1) * (1 + 2.0**-10)
    err = (got - ref).abs()
    assert bool((err <= bound + 2.0**-22 * ref.abs()).all()), float((err - bound).max())
    assert 0 < float(err.max()) and rel_err(got, ref) < 1e-3  # not exact, and small
    # the 4-bit values are the file's (only the nibble order changes): same count of each code
    file_q = np.concatenate([blocks.reshape(-1, 144)[:, 16:] & 15, blocks.reshape(-1, 144)[:, 16:] >> 4])
    mine = torch.cat([q & 15, q >> 4]).numpy()
    assert np.array_equal(np.bincount(file_q.ravel(), minlength=16), np.bincount(mine.ravel(), minlength=16))


@pytest.fixture(scope="module")
def k_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-mixtral-k")
    make_checkpoint("mixtral", path, seed=3, **K_SIZES)
    return path


def test_q4_k_model_kept_packed(k_checkpoint, tmp_path):
    """A Q4_K file: q/k/v, o, experts and LM head held as int4_zp (0.625 bytes per weight, no
    float copy), each within the Q4_K bound of the dequantized reference; logits follow it."""
    needs_kernels()
    path = tmp_path / "q4k.gguf"
    written = write_gguf(k_checkpoint, path, Q.Q4_K, tokenizer_dir=BUNDLED)
    assert sum(t == Q.Q4_K for t in written.values()) >= 8
    model = load_model(str(path), progress=False)
    ref = float_reference(path, k_checkpoint, tmp_path / "dequantized")
    ref_params = dict(ref.named_parameters())
    params = dict(model.named_parameters())
    assert {"lm_head.weight", "layers.0.attn.qkv.weight", "layers.1.moe.w13", "layers.1.moe.w2"} <= set(model.quantized)
    for name, qw in model.quantized.items():
        assert qw.fmt == "int4_zp" and params[name].is_meta
        assert qw.nbytes == int(np.prod(qw.shape)) * 5 // 8  # 0.5 + 4/32 bytes per weight
        r = ref_params[name].float()
        _, scales, mins = qw.rows()
        bound = (15 * fp16_rounding(scales) + fp16_rounding(mins)).repeat_interleave(GROUP, dim=-1)
        assert bool(((qw.dequantize() - r).abs() <= bound * (1 + 2.0**-10) + 2.0**-22 * r.abs()).all()), name
    errs = [rel_err(a[i], b[i]) for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS))
            for i in range(a.shape[0])]
    assert float(np.median(errs)) < 0.03, errs


def test_q6_k_requantized_to_int8(k_checkpoint, tmp_path):
    """Q6_K (groups of 16, int8 scales) has no exact format here: it is dequantized and held as
    int8 groups of 32. The error against gguf's dequantization: at most half an int8 step per
    weight, and its size relative to the weights, measured."""
    needs_kernels()
    t = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    ref = torch.from_numpy(dequantize(q6_k_blocks(t), Q.Q6_K).reshape(t.shape))
    from models.kernels.quant import QuantWeight

    qw = QuantWeight.of(ref, "int8")
    step = qw.rows()[1].float().repeat_interleave(GROUP, dim=-1)
    err = (qw.dequantize() - ref).abs()
    assert bool((err <= step / 2 * (1 + 1e-3)).all())
    assert rel_err(qw.dequantize(), ref) < 0.01  # int8 of 32 re-rounding: well under 1%
    # in a model: the loader's int8 weights are that re-quantization of the reference
    path = tmp_path / "q6k.gguf"
    write_gguf(k_checkpoint, path, Q.Q6_K, tokenizer_dir=BUNDLED)
    model = load_model(str(path), progress=False)
    ref_sd = dequantized_state_dict(path, k_checkpoint)
    w2 = torch.stack([ref_sd[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)])
    qw = model.quantized["layers.0.moe.w2"]
    assert qw.fmt == "int8" and torch.equal(qw.dequantize(), QuantWeight.of(w2, "int8").dequantize())


def test_mxfp4_and_float_types_exact(tmp_path, monkeypatch):
    """F16 / BF16 files load bit-exactly (the float32 file's logits from the same rounded
    weights); MXFP4 tensors (a float group's and a packed group's) are dequantized exactly."""
    hf = tmp_path / "hf"
    make_checkpoint("mixtral", hf, seed=4, **SIZES, intermediate_size=64)
    logits = {}
    for qt in (Q.F16, Q.BF16):
        path = tmp_path / f"{qt.name}.gguf"
        write_gguf(hf, path, qt, tokenizer_dir=BUNDLED)
        model = load_model(str(path), progress=False, dtype="float32")
        ref = float_reference(path, hf, tmp_path / f"ref-{qt.name}")
        for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS)):
            assert torch.equal(a, b)
        logits[qt] = prefill_logits(model, PROMPTS)
    # bf16 rounding moves the logits, a little
    assert any(not torch.equal(a, b) for a, b in zip(logits[Q.F16], logits[Q.BF16]))
    monkeypatch.setattr("models.gguf_loader._CHUNK", 3)  # MXFP4 -> int8 a few blocks at a time
    path = tmp_path / "mxfp4.gguf"
    types = {"token_embd.weight": Q.MXFP4, "blk.1.ffn_gate_inp.weight": Q.MXFP4, "blk.0.ffn_down_exps.weight": Q.MXFP4}
    write_gguf(hf, path, Q.F32, tokenizer_dir=BUNDLED, types=types)
    model = load_model(str(path), progress=False)
    ref = float_reference(path, hf, tmp_path / "ref-mxfp4")
    mine, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    for name in ("embed.weight", "layers.1.moe.gate.weight"):
        assert torch.equal(mine[name], theirs[name]), name
    # in a packed group (Mixtral's experts): int8 groups of 32 hold MXFP4 exactly (codes x 2, d = 2^(e-128))
    w2 = model.quantized["layers.0.moe.w2"]
    assert w2.fmt == "int8" and torch.equal(w2.dequantize(), theirs["layers.0.moe.w2"].float())
    assert int(w2.q.view(torch.int8).abs().max()) <= 12
    assert GGUFFile(str(path)).tensors["token_embd.weight"].kind == "MXFP4"
    assert not torch.equal(mine["embed.weight"], dict(load_model(str(hf), progress=False).named_parameters())[
        "embed.weight"])  # it was rounded to MXFP4
