"""Random-weight benchmark checkpoints (generated, cached, never committed).

`make_checkpoint(shape)` writes a Mixtral-shaped model with random weights and a byte-level
BPE tokenizer (`save_tokenizer`, trained on Python's pydoc topics) to
~/.cache/moe-serve/bench/<shape> (MOE_SERVE_BENCH_CACHE), once; the benchmarks call it. The
tests make their small tokenizers with `save_tokenizer` too (tests/conftest.py).

Shapes too big to build as a transformers model in memory (`STREAMED`: the 2.4B Mixtral of
issue 26, 9.7 GB in float32) are written by `write_random_safetensors`: one bf16 tensor at a
time into a single safetensors file (header first, then each tensor's bytes), normal(0, 0.02)
weights as transformers initializes them and unit norms, so activations stay finite; their
tokenizer is mixtral-140m's (copied), so every server tokenizes the same.
"""

from __future__ import annotations

import os
from pathlib import Path

SHAPES = {
    # the engine benchmark's model: ~140M parameters, head_dim 64 (vLLM CPU attention takes it)
    "mixtral-140m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096),
    # issue 26's llama.cpp comparison model: 2.43B parameters (hidden 2048, experts of 5632, 8
    # experts top-2, 8 layers, 16 heads of 128 with 4 KV heads, mixtral-140m's 32000-token vocab)
    "mixtral-2.4b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096),
}
STREAMED = {"mixtral-2.4b"}  # written tensor by tensor (write_random_safetensors), never whole in memory
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


def mixtral_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an HF Mixtral checkpoint with this config, in file order."""
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (heads * hd, H)), (p + "self_attn.k_proj.weight", (kv * hd, H)),
                (p + "self_attn.v_proj.weight", (kv * hd, H)), (p + "self_attn.o_proj.weight", (H, heads * hd)),
                (p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], H))]
        for e in range(cfg["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            out += [(q + "w1.weight", (inter, H)), (q + "w2.weight", (H, inter)), (q + "w3.weight", (inter, H))]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return out


def write_random_safetensors(path: str | os.PathLike, tensors: list[tuple[str, tuple[int, ...]]], *, seed: int = 0,
                             std: float = 0.02, progress: bool = True) -> int:
    """Write random bf16 `tensors` to one safetensors file, one tensor in memory at a time:
    norms (names ending in "norm.weight") are ones, everything else normal(0, std). Returns the
    parameter count. Written to `path`.part and renamed when complete."""
    import json
    import math
    import time

    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    t0, done, total = time.monotonic(), 0, offset
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (name, shape) in enumerate(tensors):
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().tobytes())
            done += 2 * t.numel()
            del t
            if progress and (i % 25 == 0 or i == len(tensors) - 1):
                print(f"[bench] {path.name}: {done / 2**30:5.2f} / {total / 2**30:.2f} GiB "
                      f"({time.monotonic() - t0:.0f}s)", flush=True)
    tmp.rename(path)
    return total // 2


def make_streamed_checkpoint(shape: str, path: Path, progress: bool = True) -> str:
    """A random-weight bf16 Mixtral of `shape` written tensor by tensor, with mixtral-140m's tokenizer."""
    import json
    import shutil

    import transformers

    cfg = SHAPES[shape]
    path.mkdir(parents=True, exist_ok=True)
    tok_src = Path(make_checkpoint("mixtral-140m"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_src / f).exists():
            shutil.copy(tok_src / f, path / f)
    conf = transformers.MixtralConfig(**cfg, bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype="bfloat16",
                                      architectures=["MixtralForCausalLM"])
    conf.save_pretrained(str(path))
    assert json.loads((path / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    tensors = mixtral_tensors(cfg)
    n = sum(math_prod(s) for _, s in tensors)
    print(f"[bench] writing random-weight {shape} ({n / 1e9:.2f}B parameters, {2 * n / 2**30:.1f} GiB bf16) to {path}",
          flush=True)
    write_random_safetensors(path / "model.safetensors", tensors, progress=progress)
    return str(path)


def math_prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_checkpoint(shape: str = "mixtral-140m") -> str:
    path = CACHE / shape
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return str(path)
    if shape in STREAMED:
        return make_streamed_checkpoint(shape, path)
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
