"""Shared fixtures: tiny random-weight MoE checkpoints with a real fast tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels can only run under Triton's interpreter, and the variable must
# be set before anything imports triton (transformers' Mixtral module does): the kernel tests
# (tests/models/kernels) rely on it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


def skip_or_fail(reason: str) -> None:
    """Skip a test whose real part (Prometheus, helm, a browser, a dev package) is missing; in CI
    (`CI` set, as .ci/run does) fail instead: there a skip would hide a broken install step."""
    if IN_CI:
        pytest.fail(f"{reason} -- CI must install it (.ci/run)", pytrace=False)
    pytest.skip(reason)
BUNDLED = REPO / "models" / "checkpoints" / "tiny-mixtral"


class RoutingCollector(list):
    """A routing listener (server.engine.stats.RoutingListener) that keeps every step's stats."""

    def on_routing(self, stats) -> None:
        self.append(stats)

    def close(self) -> None:
        pass


def save_test_tokenizer(path: str | os.PathLike, vocab_size: int = 300) -> None:
    """A small byte-level BPE fast tokenizer (first 40 pydoc topics) with a chat template."""
    from loadtest.checkpoints import save_tokenizer

    save_tokenizer(path, vocab_size, num_texts=40,
                   chat_template=("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}assistant:{% endif %}"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """A random-weight Mixtral (vocab 320, 8 experts top-2) with a tokenizer; returns its path."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("tiny-mixtral-random")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(str(path))
    save_test_tokenizer(path)
    return str(path)
