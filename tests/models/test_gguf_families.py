"""GGUF import of DeepSeek-V2/V3 (llama.cpp's `deepseek2`) and gpt-oss (`gpt-oss`): tiny random
checkpoints written as llama.cpp's convert_hf_to_gguf.py writes them (tests/models/gguf_files.py:
MLA as MQA metadata, kv_b split into k_b / v_b as newer llama.cpp does or whole as older ones,
exp_probs_b, shared experts, leading dense layers, YaRN; gpt-oss's sinks, biases, gate/up split
out of its interleaved gate_up, post_attention_norm) load into the same model as the safetensors
checkpoint:

- F32 files: logits equal (to 1e-5), greedy outputs identical;
- Q8_0 files: experts and shared experts kept packed (int8), MLA attention dequantized, logits
  follow a float run of gguf's dequantization; gpt-oss's MXFP4 experts dequantized exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import load_model
from models.gguf_loader import GGUFError, GGUFFile
from tests.conftest import BUNDLED
from tests.models.conftest import make_checkpoint
from tests.models.gguf_files import Q, write_gguf
from tests.models.simple_runner import greedy_generate, prefill_logits
from tests.models.test_gguf import PROMPTS, SIZES, float_reference, needs_kernels, rel_err

# gpt-oss: the file has no swiglu_limit; llama.cpp (and the importer) use the released 7.0
FAMILIES = {"deepseek_v2": {}, "deepseek_v3": {}, "gpt_oss": {"swiglu_limit": 7.0}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"hf-{family}")
            make_checkpoint(family, path, seed=5, **{**SIZES, **FAMILIES[family]})
            cache[family] = path
        return cache[family]

    return get


@pytest.mark.parametrize("family,split", [("deepseek_v2", False), ("deepseek_v3", True),
                                          ("gpt_oss", True)])
def test_f32_gguf_equals_safetensors(family, split, checkpoints, tmp_path):
    hf = checkpoints(family)
    path = tmp_path / "model.gguf"
    write_gguf(hf, path, Q.F32, tokenizer_dir=BUNDLED, split_kv_b=split)
    names = set(GGUFFile(str(path)).tensors)
    if family.startswith("deepseek"):
        assert ("blk.1.attn_k_b.weight" in names) == split and ("blk.1.attn_kv_b.weight" in names) != split
        assert ("blk.1.exp_probs_b.bias" in names) == (family == "deepseek_v3")
    model = load_model(str(path), progress=False)
    ref = load_model(str(hf), dtype="float32", progress=False)
    assert model.config.architecture == ref.config.architecture
    for field in ("mla", "router", "sparse_layers", "rope_scaling", "attn_scale", "rope_style", "swiglu_limit",
                  "attention_sinks", "expert_bias", "layer_windows", "shared_expert_intermediate_size"):
        assert getattr(model.config, field, None) == getattr(ref.config, field, None), field
    for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    assert greedy_generate(model, PROMPTS, 6) == greedy_generate(ref, PROMPTS, 6)


def test_deepseek_q8_0_experts_packed(checkpoints, tmp_path):
    """Q8_0 DeepSeek-V3: routed and shared experts stay int8 (the file's blocks), the MLA
    projections (no quantized kernel) and the dense first layer are dequantized to float."""
    needs_kernels()
    hf = checkpoints("deepseek_v3")
    path = tmp_path / "model.gguf"
    write_gguf(hf, path, Q.Q8_0, tokenizer_dir=BUNDLED)
    model = load_model(str(path), progress=False)
    ref = float_reference(path, hf, tmp_path / "dequantized")
    assert {"layers.1.moe.w13", "layers.1.moe.w2", "layers.1.moe.shared.w13.weight", "lm_head.weight"} <= set(
        model.quantized)
    assert all(q.fmt == "int8" for q in model.quantized.values())
    assert not any(".attn." in n or ".mlp." in n for n in model.quantized)
    ref_params = dict(ref.named_parameters())
    for name, qw in model.quantized.items():
        assert torch.equal(qw.dequantize(), ref_params[name].float()), name
    for name, p in model.named_parameters():
        if not p.is_meta:
            assert torch.equal(p.float(), ref_params[name].float()), name
    errs = [rel_err(a[i], b[i]) for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS))
            for i in range(a.shape[0])]
    assert float(np.median(errs)) < 0.03, errs


def test_gpt_oss_mxfp4_experts(checkpoints, tmp_path):
    """gpt-oss as llama.cpp ships it: MXFP4 experts kept as models/quant `mxfp4` QTensors (the
    format of gpt-oss's own checkpoints; bit for bit, only the nibble order changes), biases
    beside them; Q8_0 attention kept packed (int8); keep_quantized=False dequantizes them, exactly."""
    needs_kernels()
    hf = checkpoints("gpt_oss")
    path = tmp_path / "model.gguf"
    types = {f"blk.{i}.ffn_{k}_exps.weight": Q.MXFP4 for i in range(2) for k in ("gate", "up", "down")}
    write_gguf(hf, path, Q.Q8_0, tokenizer_dir=BUNDLED, types=types)
    assert GGUFFile(str(path)).tensors["blk.0.ffn_up_exps.weight"].kind == "MXFP4"
    model = load_model(str(path), progress=False)
    ref = float_reference(path, hf, tmp_path / "dequantized")
    theirs = dict(ref.named_parameters())
    assert set(model.quantized) >= {"layers.0.attn.qkv.weight", "layers.1.attn.o_proj.weight"}
    assert sorted(model.qweights) == [f"layers.{i}.moe.{w}" for i in range(2) for w in ("w13", "w2")]
    for name, qp in model.qweights.items():
        assert qp.fmt.value == "mxfp4" and torch.equal(qp.dequant(torch.float32), theirs[name].float()), name
        E, N, K1 = qp.param_shape
        assert qp.q.nbytes == E * N * (K1 - 1) * 17 // 32  # the file's MXFP4 bytes
    assert model.kernel_plan.layers[0].experts_format == "mxfp4"
    errs = [rel_err(a[i], b[i]) for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS))
            for i in range(a.shape[0])]
    assert float(np.median(errs)) < 0.03, errs
    plain = load_model(str(path), progress=False, keep_quantized=False)
    mine = dict(plain.named_parameters())
    assert not plain.qweights
    for name in ("layers.0.moe.w13", "layers.1.moe.w2", "layers.1.attn.sinks", "layers.0.moe.gate.bias"):
        assert torch.equal(mine[name], theirs[name]), name


def test_deepseek_refusals(checkpoints, tmp_path):
    """A kv_b that is neither whole nor split, and a gating function that does not match the
    file's router tensors, are refused by name."""
    import gguf

    hf = checkpoints("deepseek_v3")
    path = tmp_path / "no-v_b.gguf"
    write_gguf(hf, path, Q.F32, tokenizer_dir=BUNDLED, drop=("blk.0.attn_v_b.weight",))
    with pytest.raises(Exception, match=r"missing tensors \(1\): blk\.0\.attn_kv_b\.weight.*unexpected tensors "
                                        r"\(1\): blk\.0\.attn_k_b\.weight"):
        load_model(str(path), progress=False)
    path = tmp_path / "gating.gguf"
    write_gguf(hf, path, Q.F32, tokenizer_dir=BUNDLED,
               extra=lambda w: w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX))
    with pytest.raises(GGUFError, match="expert_gating_func 1 and exp_probs_b"):
        load_model(str(path), progress=False)


def test_deepseek_v3_pre_tokenizer(tmp_path):
    """A GGUF tokenizer whose pre-tokenizer is DeepSeek-V3's (`tokenizer.ggml.pre` deepseek-v3:
    digits in groups of up to three, CJK runs, ...; transformers' GGUF builder does not know it)
    tokenizes as the tokenizer.json it was converted from, not as GPT-2's split would."""
    import json
    import shutil

    import gguf
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    from models.gguf_loader import _PRE_SPLITS, load_tokenizer
    from tests.models.gguf_files import add_tokenizer

    src = tmp_path / "src"
    shutil.copytree(BUNDLED, src, ignore=shutil.ignore_patterns("*.safetensors"))
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS["deepseek-v3"]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    (src / "tokenizer.json").write_text(tok.to_str())
    for pre, name in (("deepseek-v3", "v3.gguf"), ("gpt-2", "gpt2.gguf")):
        out = tmp_path / pre
        out.mkdir()
        w = gguf.GGUFWriter(str(out / name), "deepseek2")
        add_tokenizer(w, src, pre=pre)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    ref = AutoTokenizer.from_pretrained(str(src))
    ours, gpt2 = load_tokenizer(str(tmp_path / "deepseek-v3")), load_tokenizer(str(tmp_path / "gpt-2"))
    text = "In 2024, 1234567 tokens cost $89.99!\n\n  東京 data-type x=y; 'quoted' ünïcode"
    assert ours(text).input_ids == ref(text).input_ids
    assert gpt2(text).input_ids != ref(text).input_ids  # the split matters for this text
    assert json.loads(ours.backend_tokenizer.to_str())["pre_tokenizer"]["type"] == "Sequence"


def test_fused_gate_up_and_qkv(tmp_path):
    """Files written with llama.cpp's --fuse-gate-up-exps / --fuse-qkv (`ffn_gate_up_exps`,
    `attn_qkv`): the same logits as the safetensors checkpoint (F32), and kept packed (Q8_0)."""
    from tests.models.test_gguf import FAMILIES as BASE

    hf = tmp_path / "hf"
    make_checkpoint("qwen3_moe", hf, seed=6, **{**SIZES, **BASE["qwen3_moe"]})
    path = tmp_path / "fused.gguf"
    write_gguf(hf, path, Q.F32, tokenizer_dir=BUNDLED, fuse=True)
    names = set(GGUFFile(str(path)).tensors)
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.attn_qkv.weight" in names
    assert "blk.0.ffn_gate_exps.weight" not in names and "blk.0.attn_q.weight" not in names
    model, ref = load_model(str(path), progress=False), load_model(str(hf), dtype="float32", progress=False)
    for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    needs_kernels()
    path = tmp_path / "fused-q8.gguf"
    write_gguf(hf, path, Q.Q8_0, tokenizer_dir=BUNDLED, fuse=True)
    model = load_model(str(path), progress=False)
    write_gguf(hf, tmp_path / "plain-q8.gguf", Q.Q8_0, tokenizer_dir=BUNDLED)
    plain = load_model(str(tmp_path / "plain-q8.gguf"), progress=False)
    assert {"layers.0.moe.w13", "layers.0.attn.qkv.weight"} <= set(model.quantized) == set(plain.quantized)
    for name, qw in model.quantized.items():  # Q8_0 blocks are per row: fused or not, the same bytes
        assert torch.equal(qw.q, plain.quantized[name].q) and torch.equal(qw.scales, plain.quantized[name].scales)
