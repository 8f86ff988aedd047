"""Random-weight benchmark checkpoints (generated, cached, never committed).

`make_checkpoint(shape)` writes a Mixtral-shaped model with random weights and a byte-level
BPE tokenizer (`save_tokenizer`, trained on Python's pydoc topics) to
~/.cache/moe-serve/bench/<shape> (MOE_SERVE_BENCH_CACHE), once; the benchmarks call it. The
tests make their small tokenizers with `save_tokenizer` too (tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

SHAPES = {
    # the engine benchmark's model: ~140M parameters, head_dim 64 (vLLM CPU attention takes it)
    "mixtral-140m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096),
}
CACHE = Path(os.environ.get("MOE_SERVE_BENCH_CACHE", Path.home() / ".cache" / "moe-serve" / "bench"))


def save_tokenizer(path: str | os.PathLike, vocab_size: int, num_texts: int | None = None,
                   chat_template: str | None = None) -> None:
    """A byte-level BPE fast tokenizer trained on Python's `pydoc_data` topics (the first
    `num_texts` of them, or all), with `<s>`, `</s>`, `<pad>` and an optional chat template."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:num_texts], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))


def make_checkpoint(shape: str = "mixtral-140m") -> str:
    path = CACHE / shape
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return str(path)
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"[bench] writing random-weight {shape} ({n / 1e6:.0f}M parameters) to {path}")
    model.save_pretrained(str(path))
    save_tokenizer(path, cfg.vocab_size)
    return str(path)
