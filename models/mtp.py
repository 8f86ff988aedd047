"""Multi-token-prediction (MTP) layers of DeepSeek-V3 / GLM-4.5 checkpoints, for speculative decoding.

A checkpoint with `num_nextn_predict_layers: n` stores n MTP layers after its decoder stack, at
`model.layers.{L + i}` (L = num_hidden_layers), as published:

- `enorm`, `hnorm`: RMSNorms of the next token's embedding and of the target's hidden state;
- `eh_proj`: Linear(2H -> H) over concat(enorm(embed(token t+1)), hnorm(hidden t));
- one full decoder layer of the family (`input_layernorm`, `self_attn.*`, `post_attention_layernorm`,
  `mlp.*`: MLA + MoE for DeepSeek-V3), under the same names as the main layers;
- `shared_head.norm` and `shared_head.head` (the LM head), and `embed_tokens`: where the checkpoint
  has no `shared_head.head` / `embed_tokens` for a layer, the main model's LM head / embedding is
  used (they are copies of them in the published releases).

At position t the layer reads the target's final hidden state h_t (after the final norm, as the
serving forward returns it) and the token at t+1, and its head predicts the token at t+2. The
token embedding is zeroed at position 0, as vLLM does. The layer's attention has its own paged KV
cache (one extra attention layer, indexed by the sequence's own block table: the MTP entry of
position t lives in the slot of position t). For k > n drafts the layers are chained, step s
using layer s % n and the previous step's output hidden state (vLLM's rule).

`load_model(path, mtp=True)` attaches a `MultiTokenPredictor` as `model.mtp` (models/build.py);
without it the loader skips these tensors (models/loader.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from models.config import MoEModelConfig, UnsupportedModelError
from models.kernels.packed import PackedExperts, PackedWeight, packed_linear
from models.kernels.plan import KernelPlan, LinearLayout, MoEKernel
from models.layers.mla import MLAttention
from models.layers.norm import RMSNorm
from models.loader import checkpoint_files
from models.model import DecoderLayer, fused_ops
from models.layers.paged import AttentionMetadata, KVCache
from models.weight_map import WeightMap

# families whose checkpoints carry MTP layers in the DeepSeek-V3 layout
MTP_ARCHITECTURES = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM")


def num_mtp_layers(cfg: MoEModelConfig) -> int:
    """`num_nextn_predict_layers` of the checkpoint's config (0 without MTP layers)."""
    return int(getattr(cfg.extra.get("hf_config"), "num_nextn_predict_layers", 0) or 0)


def extended_config(cfg: MoEModelConfig, n: int) -> MoEModelConfig:
    """`cfg` with `n` more layers at the end, as the MTP layers are built: MoE layers (the
    published MTP layers sit past `first_k_dense_replace`), full attention."""
    if cfg.dsa is not None or cfg.moe_shortcut:
        raise UnsupportedModelError("MTP layers of DSA or shortcut-MoE models are not supported")
    ext: dict = {"num_layers": cfg.num_layers + n, "sparse_layers": cfg.sparse_layers + (True,) * n}
    for name, pad in (("sliding_windows", None), ("attention_chunks", None), ("nope_layers", False),
                      ("layer_kinds", "attention")):
        value = getattr(cfg, name)
        if value:
            ext[name] = value + (pad,) * n
    return dataclasses.replace(cfg, **ext)


def checkpoint_tensor_names(path: str) -> set[str]:
    """Every tensor name of a checkpoint (from its index, else the safetensors headers)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    names: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as handle:
            names.update(handle.keys())
    return names


class MTPLayer(nn.Module):
    def __init__(self, cfg: MoEModelConfig, idx: int, rotary, own_embed: bool, own_head: bool):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = DecoderLayer(cfg, idx, rotary)
        self.head_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.embed = nn.Embedding(cfg.vocab_size, H) if own_embed else None
        self.head = nn.Linear(H, cfg.vocab_size, bias=False) if own_head else None
        self.eh_packed: PackedWeight | None = None  # eh_proj's packed copy (MultiTokenPredictor.apply_plan)

    def combine(self, emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """eh_proj(concat(enorm(emb), hnorm(hidden)))."""
        x = torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1)
        return self.eh_proj(x) if self.eh_packed is None else packed_linear(x, self.eh_packed)


class MultiTokenPredictor(nn.Module):
    """The checkpoint's MTP layers, attached to their target model as `model.mtp`."""

    def __init__(self, cfg: MoEModelConfig, n: int, rotary, own_embed: tuple[bool, ...] = (),
                 own_head: tuple[bool, ...] = ()):
        super().__init__()
        if n < 1:
            raise UnsupportedModelError(f"{cfg.architecture} checkpoint has no MTP layers (num_nextn_predict_layers=0)")
        self.start = cfg.num_layers
        self.config = extended_config(cfg, n)
        self.layers = nn.ModuleList(
            MTPLayer(self.config, self.start + i, rotary, bool(own_embed and own_embed[i]),
                     bool(own_head and own_head[i])) for i in range(n))
        self._target: weakref.ref | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def bind(self, target: nn.Module) -> None:
        """The target model whose embedding, LM head and rotary the layers share (a weak reference:
        `target.mtp` is this module)."""
        self._target = weakref.ref(target)

    @property
    def target(self):
        target = self._target() if self._target is not None else None
        if target is None:
            raise RuntimeError("the MTP layers are not bound to a target model (MultiTokenPredictor.bind)")
        return target

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[KVCache], step: int = 0) -> torch.Tensor:
        """One MTP pass over a step's flattened tokens: at position t, `input_ids` holds the token at
        t+1 and `hidden` [T, H] the hidden state (the target's final one, or the previous MTP step's
        output when chaining) at t. Returns the layer's output hidden state [T, H] (before
        `shared_head.norm`): the next chained step's `hidden`. Writes the layer's KV cache
        (`kv_caches[step % n]`) at `meta.slot_mapping`."""
        target = self.target
        i = step % len(self.layers)
        layer: Any = self.layers[i]
        emb = (target.embed if layer.embed is None else layer.embed)(input_ids)
        emb = emb.masked_fill((positions == 0)[:, None], 0.0)  # position 0: no embedding (vLLM)
        x = layer.combine(emb, hidden)
        cos_sin = target.rotary.cos_sin(positions, x.dtype)
        return layer.block(x, cos_sin, meta, kv_caches[i], None, positions)

    def compute_logits(self, hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
        """[N, H] MTP outputs -> [N, vocab] float32 logits of the token after next."""
        layer: Any = self.layers[step % len(self.layers)]
        h = layer.head_norm(hidden)
        if layer.head is None:
            return self.target.compute_logits(h)
        logits = layer.head(h)
        scaling = self.config.logits_scaling
        return (logits / scaling if scaling != 1.0 else logits).float()

    # -- the MTP layers' own paged KV cache ------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        elem = torch.empty((), dtype=dtype or self.eh_proj_dtype).element_size()
        return block_size * elem * sum(self.config.kv_elements_per_token(self.start + i)
                                       for i in range(len(self.layers)))

    @property
    def eh_proj_dtype(self) -> torch.dtype:
        first: Any = self.layers[0]
        return first.eh_proj.weight.dtype

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                          device=None) -> list[KVCache]:
        """One cache pair per MTP layer, shaped like the target's attention layers' (MLA: latent and
        rotary key), indexed by the same block tables."""
        target = self.target
        dtype = dtype or self.eh_proj_dtype
        first: Any = self.layers[0]
        device = device or first.eh_proj.weight.device
        shapes = type(target).kv_cache_shapes(target, num_blocks, block_size)
        return [tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes)  # type: ignore[misc]
                for _ in self.layers]

    # -- kernels -----------------------------------------------------------------------------------
    def apply_plan(self, plan: KernelPlan) -> None:
        """The kernels of the target's last MoE layer for every MTP layer (the same attention kind
        and expert kind), with packed weight copies where that layer has them (the attention's
        projections, the experts, the shared expert; `eh_proj` takes the o projection's layout)."""
        moe_layers = [lk for lk in plan.layers if lk.moe is not None]
        if not moe_layers:
            raise UnsupportedModelError("MTP layers need a target with MoE layers")
        lk = moe_layers[-1]
        ops = fused_ops(plan)
        # (the MTP layers' own weights are float: a layout the target keeps quantized is plain here)
        float_layout = (LinearLayout.PLAIN, LinearLayout.QUANTIZED)

        def packed(weight: torch.Tensor, layout: LinearLayout, index: int | None = None) -> PackedWeight | None:
            return None if layout in float_layout else PackedWeight(weight, layout, index)

        for mtp_layer in self.layers:
            layer: Any = mtp_layer
            block: Any = layer.block
            block.fused_norms, block.norm_ops = lk.fused_norms, ops[:2]
            attn = block.attn
            qkv: Any = None
            o = None
            if isinstance(attn, MLAttention):  # its projections by name, as MoEForCausalLM.apply_plan
                qkv = {n: packed(getattr(attn, n).weight, lk.qkv) for n in attn.PACKED if hasattr(attn, n)}
                o = packed(attn.o_proj.weight, lk.o)
            elif hasattr(attn, "qkv"):
                qkv, o = packed(attn.qkv.weight, lk.qkv), packed(attn.o_proj.weight, lk.o)
            attn.apply_kernels(lk, qkv, o)
            attn.rope_op = ops[2] if lk.fused_rope else None
            b = block.moe
            w13 = ([PackedWeight(b.w13, lk.gate_up, e) for e in range(b.num_experts)]
                   if lk.gate_up not in float_layout else None)
            experts = PackedExperts(b.w13, b.w2) if MoEKernel.CPU in (lk.moe, lk.moe_large) else None
            b.apply_kernels(lk, plan, w13, experts)
            if b.shared is not None:
                w13s, w2s = packed(b.shared.w13.weight, lk.shared), packed(b.shared.w2.weight, lk.shared)
                b.shared.packed = (w13s, w2s) if w13s is not None and w2s is not None else None
            layer.eh_packed = packed(layer.eh_proj.weight, lk.o)


def mtp_weight_map(family, cfg: MoEModelConfig, n: int, names: set[str]) -> tuple[WeightMap, tuple, tuple]:
    """(entries of the MTP layers' tensors onto `mtp.layers.{i}.*`, per layer whether the
    checkpoint has its own embedding, and its own LM head). `names`: the checkpoint's tensors."""
    L = cfg.num_layers
    ext = extended_config(cfg, n)
    full = family.weight_map(ext)
    out: WeightMap = {}
    own_embed, own_head = [], []
    for i in range(n):
        hf, ours = f"model.layers.{L + i}.", f"layers.{L + i}."
        mine = f"mtp.layers.{i}."
        for name, entry in full.items():
            if name.startswith(hf):
                param = entry[0]
                if not param.startswith(ours):
                    raise UnsupportedModelError(f"MTP layer entry {name} -> {param}: not a layer parameter")
                out[name] = (mine + "block." + param[len(ours):], *entry[1:])
        for theirs, mine_name in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                                  ("shared_head.norm", "head_norm")):
            out[f"{hf}{theirs}.weight"] = (f"{mine}{mine_name}.weight", ())
        own_embed.append(f"{hf}embed_tokens.weight" in names)
        own_head.append(f"{hf}shared_head.head.weight" in names)
        if own_embed[-1]:
            out[f"{hf}embed_tokens.weight"] = (f"{mine}embed.weight", ())
        if own_head[-1]:
            out[f"{hf}shared_head.head.weight"] = (f"{mine}head.weight", ())
    return out, tuple(own_embed), tuple(own_head)
