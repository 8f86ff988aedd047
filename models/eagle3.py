"""EAGLE-3 draft heads, loaded from their own directory in the published layout.

An EAGLE-3 directory (config `architectures`: `LlamaForCausalLMEagle3` or `Eagle3LlamaForCausalLM`)
holds one Llama decoder layer that drafts from the target's hidden states:

- `fc` [H, 3 Ht]: the concatenation of three target layers' hidden states -> H. The layers are the
  config's `eagle_config.eagle_aux_hidden_state_layer_ids`, by default (2, L // 2, L - 3) of a
  target with L layers; as in vLLM, the state captured for layer i is the residual stream entering
  layer i (`MoEForCausalLM.aux_hidden_layers`), concatenated in layer order;
- `midlayer`: `input_layernorm` (of the token embedding) and `hidden_norm` (of the hidden state),
  whose concatenation [2H] feeds `self_attn` (q/k/v_proj take 2H inputs; GQA with rotary), the
  hidden state being the residual; `post_attention_layernorm`, a SwiGLU `mlp`;
- `norm`, `lm_head` [draft_vocab, H] over a reduced draft vocabulary, and `d2t` [draft_vocab]:
  target id = draft id + d2t[draft id] (`t2d` is not needed);
- `embed_tokens` only in some releases: the target's embedding otherwise.

At position t the head reads embed(token t+1) and the target's aux states at t (fc applied) and
predicts token t+2; chained drafts feed the head's own pre-norm output back (no fc). Its attention
keeps a paged KV cache of one layer, indexed by the target's block tables (as models/mtp.py).
Names are accepted with the `midlayer.` prefix or as `model.layers.0.` (converted releases).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import UnsupportedModelError
from models.layers.norm import RMSNorm
from models.layers.paged import AttentionMetadata, KVCache, gather_kv, write_kv
from models.layers.rotary import RotaryEmbedding, rotate
from models.loader import CheckpointError, checkpoint_files

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...] | None  # None: the default (2, L // 2, L - 3)

    @classmethod
    def from_dir(cls, path: str) -> Eagle3Config:
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(file) as f:
            raw = json.load(f)
        archs = raw.get("architectures") or []
        if not any(a in ARCHITECTURES for a in archs):
            raise UnsupportedModelError(f"{file}: not an EAGLE-3 head (architectures {archs}; expected one of "
                                        f"{', '.join(ARCHITECTURES)})")
        H, heads = raw["hidden_size"], raw["num_attention_heads"]
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UnsupportedModelError(f"{file}: EAGLE-3 heads with rope scaling {rope} are not supported")
        aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        return cls(hidden_size=H, num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
                   head_dim=raw.get("head_dim") or H // heads, intermediate_size=raw["intermediate_size"],
                   rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                   rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
                   vocab_size=raw["vocab_size"], draft_vocab_size=raw.get("draft_vocab_size") or raw["vocab_size"],
                   target_hidden_size=raw.get("target_hidden_size") or H,
                   aux_layer_ids=tuple(aux) if aux else None)

    def aux_layers(self, target_layers: int) -> tuple[int, ...]:
        L = target_layers
        return self.aux_layer_ids or (2, L // 2, L - 3)


class Eagle3Head(nn.Module):
    def __init__(self, cfg: Eagle3Config, own_embed: bool = False):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.config = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, H, bias=False)
        self.embed = nn.Embedding(cfg.vocab_size, H) if own_embed else None
        self.input_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(2 * H, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * H, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * H, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, H, bias=False)
        self.post_attn_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.rotary = RotaryEmbedding(hd, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, embed: nn.Embedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` [T]: the token at t+1; `hidden` [T, 3 Ht] (the target's aux states, through
        fc) or [T, H] (the previous draft step's pre-norm output). Returns (normed output for
        `compute_logits`, pre-norm output for the next chained step)."""
        cfg = self.config
        if hidden.shape[-1] != cfg.hidden_size:  # the target's aux states (vLLM's rule)
            hidden = self.fc(hidden)
        table = self.embed if self.embed is not None else embed
        if table is None:
            raise ValueError("this EAGLE-3 head has no embed_tokens: pass the target's embedding")
        emb = table(input_ids)
        residual = hidden
        x = torch.cat([self.input_norm(emb), self.hidden_norm(hidden)], dim=-1)
        x = residual + self._attention(x, positions, meta, cache)
        x = x + self.down_proj(F.silu(self.gate_proj(h := self.post_attn_norm(x))) * self.up_proj(h))
        return self.norm(x), x

    def _attention(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   cache: KVCache) -> torch.Tensor:
        cfg = self.config
        T, hd = x.shape[0], cfg.head_dim
        q = self.q_proj(x).view(T, cfg.num_heads, hd)
        k = self.k_proj(x).view(T, cfg.num_kv_heads, hd)
        v = self.v_proj(x).view(T, cfg.num_kv_heads, hd)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        write_kv(cache, k.to(cache[0].dtype), v.to(cache[1].dtype), meta.slot_mapping)
        out = torch.empty(T, cfg.num_heads, hd, dtype=x.dtype, device=x.device)
        rep = cfg.num_heads // cfg.num_kv_heads
        for i in range(meta.num_seqs):  # a reference path: one draft layer, small steps
            s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            n = meta.seq_lens[i]
            keys, values = gather_kv(cache, meta.block_tables[i], n)
            keys = keys.to(x.dtype).repeat_interleave(rep, 1).transpose(0, 1)  # [heads, n, hd]
            values = values.to(x.dtype).repeat_interleave(rep, 1).transpose(0, 1)
            qi = q[s:e].transpose(0, 1)  # [heads, m, hd]
            m = e - s
            mask = torch.arange(n, device=x.device)[None, :] <= torch.arange(n - m, n, device=x.device)[:, None]
            out[s:e] = F.scaled_dot_product_attention(qi, keys, values, attn_mask=mask).transpose(0, 1)
        return self.o_proj(out.reshape(T, -1))

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, target vocab] float32: the draft vocabulary's logits at their target ids,
        -inf elsewhere."""
        draft = self.lm_head(normed).float()
        out = torch.full((normed.shape[0], self.config.vocab_size), float("-inf"), device=normed.device)
        ids = torch.arange(self.config.draft_vocab_size, device=normed.device) + self.get_buffer("d2t")
        out[:, ids] = draft
        return out

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                          device=None) -> KVCache:
        shape = (num_blocks, block_size, self.config.num_kv_heads, self.config.head_dim)
        dtype = dtype or self.fc.weight.dtype
        device = device or self.fc.weight.device
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


_NAMES = {  # published name (after the prefix is normalised) -> ours
    "fc.weight": "fc.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight", "d2t": "d2t",
    "embed_tokens.weight": "embed.weight",
    "midlayer.input_layernorm.weight": "input_norm.weight", "midlayer.hidden_norm.weight": "hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight": "post_attn_norm.weight",
    **{f"midlayer.self_attn.{p}.weight": f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"midlayer.mlp.{p}.weight": f"{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}
_IGNORED = ("t2d",)


def _published(name: str) -> str:
    name = name.removeprefix("model.")
    return "midlayer." + name[len("layers.0."):] if name.startswith("layers.0.") else name


def _tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        files = checkpoint_files(path)
    except CheckpointError:
        bin_file = os.path.join(path, "pytorch_model.bin")
        if not os.path.isfile(bin_file):
            raise
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def load_eagle3(path: str, target_layers: int, target_hidden: int, vocab_size: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Eagle3Head:
    """The EAGLE-3 head of directory `path`, checked against its target (L layers, hidden size,
    vocabulary); every published tensor must be there and nothing else."""
    cfg = Eagle3Config.from_dir(path)
    if cfg.vocab_size != vocab_size:
        raise UnsupportedModelError(f"EAGLE-3 head {path!r}: vocabulary {cfg.vocab_size} differs from the target's "
                                    f"{vocab_size}")
    if cfg.target_hidden_size != target_hidden:
        raise UnsupportedModelError(f"EAGLE-3 head {path!r}: target_hidden_size {cfg.target_hidden_size} differs "
                                    f"from the target's hidden size {target_hidden}")
    bad = [i for i in cfg.aux_layers(target_layers) if not 0 <= i < target_layers]
    if bad:
        raise UnsupportedModelError(f"EAGLE-3 head {path!r}: aux layers {bad} outside the target's {target_layers}")
    raw = {_published(k): v for k, v in _tensors(path).items() if _published(k) not in _IGNORED}
    head = Eagle3Head(cfg, own_embed="embed_tokens.weight" in raw)
    params = {**dict(head.named_parameters()), **dict(head.named_buffers())}
    unexpected = sorted(set(raw) - set(_NAMES))
    missing = sorted(n for n, ours in _NAMES.items() if ours in params and n not in raw)
    if unexpected or missing:
        raise CheckpointError(f"EAGLE-3 head {path!r}: missing tensors {missing}; unexpected tensors {unexpected}")
    with torch.no_grad():
        for name, t in raw.items():
            dest = params[_NAMES[name]]
            if tuple(dest.shape) != tuple(t.shape):
                raise CheckpointError(f"EAGLE-3 head {path!r}: {name} is {tuple(t.shape)}, expected "
                                      f"{tuple(dest.shape)}")
            dest.copy_(t.to(dest.dtype))
    ids = torch.arange(cfg.draft_vocab_size) + head.get_buffer("d2t")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise CheckpointError(f"EAGLE-3 head {path!r}: d2t maps draft ids outside the target vocabulary")
    head.rotary.reset_parameters()
    head = head.to(device=device, dtype=dtype)  # d2t stays an integer buffer
    return head.eval().requires_grad_(False)
