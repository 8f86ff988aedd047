"""Checkpoint loading: safetensors (single file or sharded index) -> our parameters.

Each family gives an explicit name-mapping table (`models/<family>.py`): every checkpoint
tensor name maps to one of our parameters and the slice of it that it fills (our q/k/v and
gate/up projections are fused, our experts stacked). Loading checks the table both ways:
a missing tensor, an unexpected tensor or a shape mismatch fails, naming the tensors.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from models.config import MoEModelConfig

# checkpoint name -> (our parameter name, index into that parameter; () for all of it)
WeightMap = dict[str, tuple[str, tuple]]

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    pass


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {path!r}")
    return [os.path.join(path, f) for f in found]


def iter_tensors(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(path)
    for file in tqdm(files, desc="loading shards", unit="shard", disable=not progress or len(files) < 2):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def attention_entries(cfg: MoEModelConfig, layer: int, hf_prefix: str, ours: str) -> WeightMap:
    """q/k/v (fused into our qkv), o_proj, and q/k norms of one layer."""
    q, kv = cfg.q_size, cfg.kv_size
    out: WeightMap = {}
    parts = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    kinds = ["weight"] + (["bias"] if cfg.qkv_bias else [])
    for name, sl in parts.items():
        for kind in kinds:
            out[f"{hf_prefix}.{name}_proj.{kind}"] = (f"{ours}.qkv.{kind}", (sl,))
    out[f"{hf_prefix}.o_proj.weight"] = (f"{ours}.o_proj.weight", ())
    if cfg.o_bias:
        out[f"{hf_prefix}.o_proj.bias"] = (f"{ours}.o_proj.bias", ())
    if cfg.qk_norm:
        out[f"{hf_prefix}.q_norm.weight"] = (f"{ours}.q_norm.weight", ())
        out[f"{hf_prefix}.k_norm.weight"] = (f"{ours}.k_norm.weight", ())
    return out


def swiglu_entries(inter: int, hf_gate: str, hf_up: str, hf_down: str, w13: str, w2: str, expert=None) -> WeightMap:
    """gate/up -> halves of our fused w13, down -> w2 (optionally one expert of a stack)."""
    e = () if expert is None else (expert,)
    return {
        hf_gate: (w13, e + (slice(0, inter),)),
        hf_up: (w13, e + (slice(inter, 2 * inter),)),
        hf_down: (w2, e),
    }


def common_entries(cfg: MoEModelConfig) -> WeightMap:
    out: WeightMap = {
        "model.embed_tokens.weight": ("embed.weight", ()),
        "model.norm.weight": ("norm.weight", ()),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", ())
    for i in range(cfg.num_layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = (f"layers.{i}.input_norm.weight", ())
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (f"layers.{i}.post_attn_norm.weight", ())
        out.update(attention_entries(cfg, i, f"model.layers.{i}.self_attn", f"layers.{i}.attn"))
    return out


def load_weights(model: torch.nn.Module, path: str, weight_map: WeightMap, progress: bool = True) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    missing_params = sorted({p for p, _ in weight_map.values()} - set(params))
    if missing_params:  # a bug in a mapping table, not in the checkpoint
        raise CheckpointError(f"mapping table names unknown parameters: {missing_params[:8]}")
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for name, tensor in iter_tensors(path, progress):
        entry = weight_map.get(name)
        if entry is None:
            if not name.endswith(IGNORED_SUFFIXES):
                unexpected.append(name)
            continue
        param_name, index = entry
        dest = params[param_name].data[index] if index else params[param_name].data
        if tuple(dest.shape) != tuple(tensor.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs expected {tuple(dest.shape)}")
            continue
        dest.copy_(tensor.to(dest.dtype))
        seen.add(name)
    missing = sorted(set(weight_map) - seen - {m.split(":")[0] for m in mismatched})
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_names(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not fit {type(model).__name__}: " + "; ".join(problems))


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
