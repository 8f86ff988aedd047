"""GGUF import (models/gguf_loader.py): tiny random-weight checkpoints written as llama.cpp writes
them (tests/models/gguf_files.py: the `gguf` package's writer and quantizer, llama.cpp's names,
the q/k permutation, stacked experts, the tokenizer as metadata) load into the same model.

- F32 files: logits equal the safetensors checkpoint's (Mixtral, Qwen2-MoE with a shared expert
  and a dense layer, Qwen3-MoE, OLMoE);
- Q8_0 / Q4_0 / Q4_1 files: the weights stay packed (int8 / int4 / int4_zp) holding exactly the
  `gguf` package's dequantization of the file, in the file's bytes (the plan's accounting too),
  and the logits follow a float run of that dequantization (within the int8 activations' error);
- mixed files: a fused weight of several formats, a Q5_x tensor dequantized at load (logged);
- refusals: an architecture or a tensor type we do not run, named.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models import load_model
from models.config import UnsupportedModelError
from models.gguf_loader import GGUFError, GGUFFile, gguf_path, load_tokenizer, tokenizer_source
from models.kernels.plan import LinearLayout, MoEKernel
from tests.conftest import BUNDLED
from tests.models.conftest import make_checkpoint
from tests.models.gguf_files import Q, dequantized_state_dict, write_gguf
from tests.models.simple_runner import prefill_logits

# the bundled tokenizer's 4096 tokens (byte-level BPE); sizes multiples of 32 (the block size)
SIZES = dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, bos_token_id=0, eos_token_id=1)
FAMILIES = {
    "mixtral": dict(intermediate_size=64),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      mlp_only_layers=[1]),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=32, head_dim=32, mlp_only_layers=[]),
    "olmoe": dict(intermediate_size=32),
}
PROMPTS = [[0, 450, 1601, 1153, 906, 12, 77, 310, 2000, 5], [0, 7, 8, 900, 41, 3999]]


def needs_kernels() -> None:
    from models.kernels import cpu_ops

    if not cpu_ops.load():
        pytest.skip("the C kernels are not built here (no compiler)")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> its safetensors directory (written once per module)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"hf-{family}")
            make_checkpoint(family, path, seed=1, **{**SIZES, **FAMILIES[family]})
            cache[family] = path
        return cache[family]

    return get


def gguf_of(hf_dir: Path, out_dir: Path, qtype, **kw) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{hf_dir.name}-{qtype.name}.gguf"
    if not path.exists():
        write_gguf(hf_dir, path, qtype, tokenizer_dir=BUNDLED, **kw)
    return path


def float_reference(path: Path, hf_dir: Path, out: Path) -> torch.nn.Module:
    """Our float32 model over the `gguf` package's dequantization of the file (a safetensors copy)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "config.json", out / "config.json")
    save_file(dequantized_state_dict(path, hf_dir), str(out / "model.safetensors"))
    return load_model(str(out), dtype="float32", progress=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_gguf_equals_safetensors(family, checkpoints, tmp_path):
    """Same weights, two files: the logits agree to 1e-4 (q/k rows un-permuted for llama)."""
    hf = checkpoints(family)
    path = gguf_of(hf, tmp_path, Q.F32)
    model = load_model(str(path), progress=False)
    ref = load_model(str(hf), dtype="float32", progress=False)
    assert model.config.architecture == ref.config.architecture
    assert model.config.sparse_layers == ref.config.sparse_layers and not model.quantized
    for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())


def packed_tensor_bytes(path: Path) -> int:
    """The file's bytes of Q8_0 / Q4_0 / Q4_1 tensors in the groups our kernels run quantized."""
    keep = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "_exps.", "_shexp.weight", "output.weight")
    return sum(t.data.nbytes for t in GGUFFile(str(path)).tensors.values() if t.kind in ("Q8_0", "Q4_0", "Q4_1")
               and any(k in t.name for k in keep) and "gate_inp" not in t.name)


def test_header_reader_matches_gguf_reader(checkpoints, tmp_path):
    """The importer's header reader sees what the gguf package's GGUFReader sees: metadata,
    tensor names, types, shapes and bytes (a file without the tokenizer: GGUFReader is slow on it)."""
    path = tmp_path / "model.gguf"
    write_gguf(checkpoints("qwen2_moe"), path, Q.Q4_1, tokenizer=False,
               types={"blk.0.attn_v.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.F16})
    ours, theirs = GGUFFile(str(path)), gguf.GGUFReader(str(path))
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key] == field.contents(), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.kind == t.tensor_type.name and mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert mine.data.tobytes() == np.asarray(t.data).tobytes()


@pytest.mark.parametrize("family,qtype,fmt", [("mixtral", Q.Q8_0, "int8"), ("mixtral", Q.Q4_0, "int4"),
                                              ("mixtral", Q.Q4_1, "int4_zp"), ("qwen2_moe", Q.Q4_0, "int4")])
def test_packed_gguf_keeps_the_file_blocks(family, qtype, fmt, checkpoints, tmp_path):
    needs_kernels()
    hf = checkpoints(family)
    path = gguf_of(hf, tmp_path, qtype)
    model = load_model(str(path), progress=False)
    ref = float_reference(path, hf, tmp_path / "dequantized")
    plan = model.kernel_plan
    names = set(model.quantized)
    expected = {"lm_head.weight", "layers.0.attn.qkv.weight", "layers.1.attn.o_proj.weight", "layers.0.moe.w13",
                "layers.0.moe.w2"} | ({"layers.0.moe.shared.w13.weight"} if family == "qwen2_moe" else set())
    assert expected <= names and all(q.fmt == fmt for q in model.quantized.values())
    params = dict(model.named_parameters())
    assert all(params[n].is_meta for n in names)  # no float copy of a packed weight
    # the file's bytes, the resident bytes and the plan's accounting agree
    assert sum(q.nbytes for q in model.quantized.values()) == plan.quantized_bytes == packed_tensor_bytes(path)
    assert plan.quantization == fmt and plan.lm_head == LinearLayout.QUANTIZED
    assert plan.layers[0].moe == MoEKernel.CPU and plan.layers[0].quant == fmt
    # each packed weight is exactly the gguf package's dequantization (q/k un-permuted, experts stacked)
    ref_params = dict(ref.named_parameters())
    for name in names:
        assert torch.equal(model.quantized[name].dequantize(), ref_params[name].float()), name
    # the logits follow the dequantized model's, within the error of the kernels' int8 activations
    errs = [rel_err(a[i], b[i]) for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS))
            for i in range(a.shape[0])]
    assert float(np.median(errs)) < 0.03 and max(errs) < 0.3, errs


def test_mixed_gguf_and_dequantized_types(tmp_path, caplog):
    """llama-quantize mixes types: q/k in Q4_0 with v in Q8_0 make the fused q/k/v int8; a Q6_K
    (K-quant) and a Q5_1 expert stack and a Q5_0 LM head (types our kernels do not run) are
    dequantized by the gguf package at load and held as int8 (with the rest of their layer's
    experts), each named in a log line; the model runs, near its dequantized reference."""
    needs_kernels()
    hf = tmp_path / "hf"
    make_checkpoint("mixtral", hf, seed=2, **{**SIZES, "intermediate_size": 256})  # K-quants: rows of 256
    types = {"blk.0.attn_v.weight": Q.Q8_0, "blk.1.ffn_down_exps.weight": Q.Q6_K, "blk.0.ffn_up_exps.weight": Q.Q5_1,
             "output.weight": Q.Q5_0}
    path = gguf_of(hf, tmp_path, Q.Q4_0, types=types)
    with caplog.at_level(logging.INFO, logger="models.gguf_loader"):
        model = load_model(str(path), progress=False)
    q = model.quantized
    assert q["layers.0.attn.qkv.weight"].fmt == "int8" and q["layers.1.attn.qkv.weight"].fmt == "int4"
    # one format per layer's experts (the C experts kernel's): the widest of gate, up and down
    assert {q[f"layers.{i}.moe.{w}"].fmt for i in (0, 1) for w in ("w13", "w2")} == {"int8"}
    assert q["lm_head.weight"].fmt == "int8"
    for name, kind in (("blk.1.ffn_down_exps.weight", "Q6_K"), ("blk.0.ffn_up_exps.weight", "Q5_1"),
                       ("blk.0.ffn_gate_exps.weight", "Q4_0"), ("output.weight", "Q5_0"),
                       ("blk.0.attn_q.weight", "Q4_0")):
        assert any(name in r.message and kind in r.message and "int8" in r.message for r in caplog.records), name
    assert model.kernel_plan.quantized_bytes == sum(w.nbytes for w in q.values())
    assert "GGUF weights kept packed" in " ".join(model.kernel_plan.notes)
    ref = float_reference(path, hf, tmp_path / "dequantized")
    ref_params = dict(ref.named_parameters())
    for name, w in q.items():  # requantized to int8: within int8's rounding of the dequantized values
        assert rel_err(w.dequantize(), ref_params[name].float()) < (0.01 if w.fmt == "int8" else 1e-7), name
    errs = [rel_err(a[i], b[i]) for a, b in zip(prefill_logits(model, PROMPTS), prefill_logits(ref, PROMPTS))
            for i in range(a.shape[0])]
    assert float(np.median(errs)) < 0.03, errs


def test_gguf_tokenizer_from_metadata(checkpoints, tmp_path):
    """transformers builds the tokenizer from the file's metadata, offline, for an architecture it
    does not load from GGUF itself (olmoe): the same ids, special tokens and chat template as the
    tokenizer.json it was written from; a directory with one .gguf is a model."""
    from transformers import AutoTokenizer

    path = gguf_of(checkpoints("olmoe"), tmp_path / "one", Q.F32)
    assert gguf_path(str(path.parent)) == str(path) and gguf_path(str(BUNDLED)) is None
    assert tokenizer_source(str(path.parent)) == (str(path.parent), {"gguf_file": path.name})
    tok = load_tokenizer(str(path.parent))
    ref = AutoTokenizer.from_pretrained(str(BUNDLED))
    assert sorted(tok.all_special_ids) == sorted(ref.all_special_ids) and len(tok) == len(ref) == 4096
    assert tok("a <|endoftext|> b").input_ids == ref("a <|endoftext|> b").input_ids  # no id past the vocabulary
    assert tok.decode([6, 300, 1], skip_special_tokens=True) == ref.decode([6, 300, 1], skip_special_tokens=True)
    text = "Hello world, the list data type <|user|> 12345 ünïcode"
    assert tok(text).input_ids == ref(text).input_ids and tok.chat_template == ref.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


def test_gguf_refusals(checkpoints, tmp_path):
    hf = checkpoints("mixtral")
    with pytest.raises(GGUFError, match="architecture 'phi3' is not supported"):
        load_model(str(gguf_of(hf, tmp_path / "phi3", Q.F32, arch="phi3")), progress=False)
    # a tensor type neither kept nor dequantized: named with its tensors, before any allocation
    path = tmp_path / "i32" / "model.gguf"
    path.parent.mkdir()
    write_gguf(hf, path, Q.F32, tokenizer_dir=BUNDLED, types={"blk.0.ffn_norm.weight": Q.I32})
    with pytest.raises(GGUFError, match=r"not supported \(I32: blk\.0\.ffn_norm\.weight\)"):
        load_model(str(path), progress=False)
    with pytest.raises(UnsupportedModelError, match="--quantization int8 with a GGUF checkpoint"):
        load_model(str(gguf_of(hf, tmp_path, Q.F32)), progress=False, quantization="int8")
    # two .gguf files in a directory: which one is meant is not guessed
    shutil.copy(gguf_of(hf, tmp_path, Q.F32), tmp_path / "second.gguf")
    with pytest.raises(GGUFError, match="2 .gguf files"):
        load_model(str(tmp_path), progress=False)
    # one part of a split file
    split = tmp_path / "split" / "model-00001-of-00002.gguf"
    split.parent.mkdir()
    w = gguf.GGUFWriter(str(split), "llama")
    w.add_uint16("split.count", 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(GGUFError, match="one of 2 split GGUF files"):
        load_model(str(split), progress=False)
    # a damaged file
    bad = tmp_path / "bad" / "model.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_model(str(bad), progress=False)
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
