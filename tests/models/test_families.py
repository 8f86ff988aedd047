"""Family specifics beyond parity: multi-token-prediction layers skipped, remote-code config
variants read, unsupported options named, real checkpoints' configs mapped (KV bytes/token)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import UnsupportedModelError, load_model
from models.hf_config import load_config
from tests.models.simple_runner import prefill_logits
from models.loader import CheckpointError
from tests.models.conftest import edit_config, make_checkpoint
from tests.models.test_parity import PROMPTS

ROOT = Path(__file__).resolve().parents[2]


def _load(path):
    return load_model(str(path), dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3")
    make_checkpoint("deepseek_v3", path)
    return path


def test_mtp_layers_are_skipped_with_a_log_line(deepseek_dir, tmp_path, caplog):
    """DeepSeek-V3 / GLM-4.5 checkpoints carry their multi-token-prediction layer as
    `model.layers.{num_hidden_layers}`; ERNIE its `mtp_*` modules: not part of the served model."""
    base = prefill_logits(_load(deepseek_dir), PROMPTS[1:2])[0]
    for f in deepseek_dir.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    extra = {name.replace("model.layers.2.", "model.layers.3."): t.clone()
             for name, t in tensors.items() if name.startswith("model.layers.2.")}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    extra["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
    save_file({**tensors, **extra}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="models.loader"):
        model = _load(tmp_path)
    assert torch.equal(prefill_logits(model, PROMPTS[1:2])[0], base)
    assert f"ignored {len(extra)} tensors of modules beyond the 3 served layers" in caplog.text
    save_file({**tensors, "model.layers.1.mlp.unknown.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.1\.mlp\.unknown\.weight"):
        _load(tmp_path)


def test_remote_code_model_type_reads_with_the_architecture_config(deepseek_dir, tmp_path):
    """Kimi K2's config.json says model_type kimi_k2 (remote code) for a DeepSeek-V3 architecture."""
    for f in deepseek_dir.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    edit_config(tmp_path, model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    cfg = load_config(str(tmp_path))
    assert cfg.architecture == "DeepseekV3ForCausalLM" and cfg.mla.kv_lora_rank == 32
    same = prefill_logits(_load(tmp_path), PROMPTS[1:2])[0]
    assert torch.equal(same, prefill_logits(_load(deepseek_dir), PROMPTS[1:2])[0])


@pytest.mark.parametrize("family, changes, named", [
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func='softmax'"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    ("ernie4_5_moe", dict(moe_num_experts=[8, 8]), "moe_num_experts"),
    ("glm4_moe", dict(n_group=3), "n_group=3"),
    ("gpt_oss", dict(hidden_act="gelu"), "hidden_act"),
    ("granitemoehybrid", dict(num_local_experts=0), "num_local_experts=0"),
    ("hunyuan_moe", dict(moe_topk=[2, 1, 2]), "moe_topk"),
    ("hunyuan_moe", dict(num_shared_expert=2), "num_shared_expert=2"),
    ("hunyuan_moe", dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope type 'dynamic'"),
    ("longcat_flash", dict(head_dim=16), "head_dim=16"),
    ("longcat_flash", dict(zero_expert_type="constant"), "zero_expert_type='constant'"),
])
def test_unsupported_options_are_named(family, changes, named, tmp_path):
    make_checkpoint(family, tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(UnsupportedModelError, match=named):
        load_config(str(tmp_path))


def test_real_checkpoint_configs_and_kv_bytes_per_token():
    """scripts/model_families.py maps each family's published config; its KV bytes/token equal the
    formula: MLA caches (kv_lora_rank + qk_rope_head_dim) per layer, GQA 2 x kv_heads x head_dim."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "model_families.py")], capture_output=True,
                         text=True, check=True).stdout
    rows = {cells[2]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:] if line.startswith("|"))}
    bf16 = 2
    expected = {
        "DeepSeek-V3 / R1": 61 * (512 + 64) * bf16,
        "DeepSeek-V2-Lite": 27 * (512 + 64) * bf16,
        "Mixtral-8x7B": 32 * 2 * 8 * 128 * bf16,
        "Qwen3-30B-A3B": 48 * 2 * 4 * 128 * bf16,
        "GLM-4.5": 92 * 2 * 8 * 128 * bf16,
        "gpt-oss-120b": 36 * 2 * 8 * 64 * bf16,
        "Llama-4-Scout-17B-16E (text)": 48 * 2 * 8 * 128 * bf16,
        "MiniMax-M2": 62 * 2 * 8 * 128 * bf16,
        "granite-4.0-h-tiny": 4 * 2 * 4 * 128 * bf16,  # the 4 attention layers of 40 (36 are Mamba2)
        "Hunyuan-A13B": 32 * 2 * 8 * 128 * bf16,
        "dots.llm1.inst": 62 * 2 * 32 * 128 * bf16,
        "LongCat-Flash-Chat": 2 * 28 * (512 + 64) * bf16,  # two MLA sublayers per layer
    }
    for checkpoint, nbytes in expected.items():
        assert rows[checkpoint][5] == f"{nbytes:,}", checkpoint
    assert "MLA" in rows["DeepSeek-V3 / R1"][3] and "groups 4/8" in rows["DeepSeek-V3 / R1"][4]
    assert "sliding 128 on 18/36" in rows["gpt-oss-120b"][3] and "sinks" in rows["gpt-oss-120b"][3]
    assert "chunked 8192 on 36/48" in rows["Llama-4-Scout-17B-16E (text)"][3]
    assert "+ 256 zero-computation" in rows["LongCat-Flash-Chat"][4] and "28 pairs" in rows["LongCat-Flash-Chat"][4]
    assert f"per-head K and V would take {61 * 128 * (192 + 128) * bf16:,}" in out
    # the README shows exactly this table
    readme = (ROOT / "README.md").read_text()
    assert out.strip() in readme, "README's families table is stale: rerun scripts/model_families.py"
