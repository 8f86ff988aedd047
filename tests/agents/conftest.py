"""Fixtures for the coding-agent tests (Codex CLI, Claude Code): their prompts (system prompt
and tool definitions) are tens of thousands of tokens, past the bundled model's 2,048-token
context, so they run on a tiny random-weight Mixtral with the bundled tokenizer and a 64k
context, made here. Its output head favours the end-of-sequence token, so that an agent that
sends no output limit still gets answers of a few tokens: a random model would otherwise fill
the whole context."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import BUNDLED

LONG_CONTEXT = 65536
EOS_LOGIT = 0.95  # the head's weight on that feature: answers of a few tokens at temperature 1


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Mixtral (2 layers, hidden 64, 4 experts top-2) with the bundled
    tokenizer and 64k positions; returns its directory."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("long-context-model")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=LONG_CONTEXT, rope_theta=1e6, initializer_range=0.02, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a constant feature in every token's embedding that the head maps to EOS
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[cfg.eos_token_id].zero_()
        model.lm_head.weight[cfg.eos_token_id, 0] = EOS_LOGIT
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(BUNDLED / name, path / name)
    return path
