"""Kimi Delta Attention pieces the family parity tests do not reach: prefills longer than one
64-token chunk of the chunked rule, from a carried state, against transformers' token-by-token
reference; and the release's dense-MLP naming loading like transformers' own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.kimi_linear.modeling_kimi_linear import (
    recurrent_kimi_delta_attention,
)

from models import load_model
from models.config import UnsupportedModelError
from models.hf_config import load_config
from models.layers.kda import chunk_kda, l2norm, recurrent_kda_step
from models.loader import CheckpointError
from tests.models.conftest import edit_config, make_checkpoint
from tests.models.simple_runner import prefill_logits


@pytest.mark.parametrize("T", [1, 64, 150])
def test_chunked_rule_matches_the_recurrent_reference(T):
    """Several chunks (150 = 2 full + a padded one), a nonzero starting state, decays that vary
    per channel: outputs and final state equal the reference's token-by-token recurrence, and our
    batched decode step gives the same for the next token."""
    g_ = torch.Generator().manual_seed(T)
    H, d = 3, 8
    q, k, v = (torch.randn(T + 1, H, d, generator=g_) for _ in range(3))
    g = -torch.rand(T + 1, H, d, generator=g_) * 0.5  # log decays per channel
    beta = torch.rand(T + 1, H, generator=g_)
    state = torch.randn(H, d, d, generator=g_) * 0.1
    ref_out, ref_state = recurrent_kimi_delta_attention(q[None], k[None], v[None], g[None], beta[None],
                                                        initial_state=state[None], output_final_state=True,
                                                        use_qk_l2norm_in_kernel=True)
    qn, kn = l2norm(q) * d**-0.5, l2norm(k)
    out, S = chunk_kda(qn[:T], kn[:T], v[:T], g[:T], beta[:T], state)
    assert (out - ref_out[0, :T]).abs().max().item() < 1e-4
    one, S = recurrent_kda_step(qn[T:], kn[T:], v[T:], g[T:], beta[T:], S[None])
    assert (one[0] - ref_out[0, T]).abs().max().item() < 1e-4
    assert (S[0] - ref_state[0]).abs().max().item() < 1e-4


def test_release_naming_of_the_dense_mlp_loads(tmp_path):
    """transformers saves a dense layer's MLP under `block_sparse_moe`; the release names it `mlp`:
    the same weights under either name give the same logits, and a missing one is named."""
    make_checkpoint("kimi_linear", tmp_path)
    prompts = [[1, 17, 29, 3, 250, 71]]
    want = prefill_logits(load_model(str(tmp_path), dtype="float32", device="cpu", progress=False), prompts)[0]
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    renamed = {n.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): t for n, t in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(file), metadata={"format": "pt"})
    got = prefill_logits(load_model(str(tmp_path), dtype="float32", device="cpu", progress=False), prompts)[0]
    assert torch.equal(got, want)
    del renamed["model.layers.0.mlp.up_proj.weight"]
    save_file(renamed, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.0\.block_sparse_moe\.up_proj"):
        load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)


@pytest.mark.parametrize("option, value", [("mla_use_nope", False), ("moe_router_activation_func", "softmax"),
                                           ("linear_attn_config", {"gate_lower_bound": -5.0})])
def test_options_we_do_not_implement_are_refused(tmp_path, option, value):
    make_checkpoint("kimi_linear", tmp_path)
    edit_config(tmp_path, **{option: value})
    with pytest.raises(UnsupportedModelError, match=option):
        load_config(str(tmp_path))
