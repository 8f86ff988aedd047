"""Engine parity for INT4 / INT8 checkpoints (GPTQ, AWQ, compressed-tensors int; issue 27): the loader
keeps their weights as QTensors through models/quant/int_readers.py.

Each case quantizes a tiny random Mixtral / Qwen3-MoE (expert and attention linears, as releases do:
tests/quant_checkpoints.py), writes the dequantized weights as a plain checkpoint, and requires our
engine on the quantized checkpoint to match our engine on the dequantized one: prefill logits within
1e-3 and greedy continuations identical. Then the memory acceptance, from the engine's own accounting
(`weight_bytes`): the model's resident quantized weights take at most 1.05x the bytes of the
checkpoint's quantized tensors, and every quantized linear and expert stack is held in its format.
"""

from __future__ import annotations

import math

import pytest
from safetensors import safe_open

from models import load_model
from models.hf_config import load_config
from models.loader import checkpoint_files
from models.quant.int_readers import int_reader
from tests.models.conftest import make_checkpoint
from tests.models.simple_runner import greedy_generate, prefill_logits
from tests.models.test_parity import PROMPTS
from tests.quant_checkpoints import quantize_checkpoint, write_dequantized

CASES = [
    ("mixtral", "gptq", dict(bits=4, group_size=32, sym=True)),
    ("qwen3_moe", "gptq", dict(bits=4, group_size=16, sym=False, checkpoint_format="gptq_v2")),
    ("mixtral", "awq", dict(group_size=32)),
    ("qwen3_moe", "compressed-tensors", dict(bits=4, group_size=16, sym=True)),  # its experts' K is 48
    ("mixtral", "compressed-tensors", dict(bits=4, strategy="channel", sym=False)),
    ("mixtral", "compressed-tensors", dict(bits=8, strategy="channel", ct_format="int-quantized")),
]


def checkpoint_quantized_bytes(path) -> int:
    """Bytes of the checkpoint's quantized tensors (every tensor a reader groups)."""
    reader = int_reader(load_config(str(path)).extra["quant"])
    total = 0
    for f in checkpoint_files(str(path)):
        with safe_open(f, framework="pt") as h:
            names = list(h.keys())
            members = {m for g in reader.group(names).values() for m in g}
            for n in members:
                t = h.get_slice(n)
                shape, dtype = t.get_shape(), t.get_dtype()
                size = {"I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1}[dtype]
                total += size * math.prod(shape)
    return total


@pytest.mark.parametrize("family, method, kw", CASES)
def test_int_checkpoint_matches_dequantized(family, method, kw, tmp_path):
    src, qdir, ddir = tmp_path / "src", tmp_path / "quantized", tmp_path / "dequantized"
    make_checkpoint(family, src, num_hidden_layers=2)
    reference = quantize_checkpoint(src, qdir, method, **kw)
    write_dequantized(src, ddir, reference)
    ours = load_model(str(qdir), dtype="float32", device="cpu", progress=False)
    ref = load_model(str(ddir), dtype="float32", device="cpu", progress=False)
    for i, (a, b) in enumerate(zip(prefill_logits(ours, PROMPTS), prefill_logits(ref, PROMPTS), strict=True)):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-3, f"prompt {i}: max abs logit diff {diff}"
    assert greedy_generate(ours, PROMPTS, 8) == greedy_generate(ref, PROMPTS, 8)
    formats = set(ours.weight_formats().values())
    want = {"int8_channel"} if kw.get("bits") == 8 else {"int4_group"}
    assert formats == want, formats
    kept = set(ours.qweights)
    assert any(n.endswith("moe.w13") for n in kept) and any(n.endswith("attn.qkv.weight") for n in kept), kept
    resident = ours.weight_bytes()["quantized"]
    assert resident == sum(q.q.nbytes for q in ours.qweights.values())
    shipped = checkpoint_quantized_bytes(qdir)
    assert resident <= 1.05 * shipped, f"resident quantized bytes {resident} vs {shipped} in the checkpoint"
