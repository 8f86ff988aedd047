"""The decoder stack shared by every supported MoE family.

Families differ only in their config (attention kind and variants per layer, routing, expert
variants, dense layers, multipliers) and in their checkpoint names (see `models/<family>.py`
mapping tables); the compute is here and in `models/layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import MoEModelConfig
from models.kernels import SYNC_FREE_BACKENDS, KernelConfig
from models.kernels.cpu_linear import PackedWeight, packed_linear
from models.kernels.cpu_moe import PackedExperts
from models.layers.attention import Attention, AttentionMetadata, KVCache
from models.layers.mla import MLAttention
from models.layers.moe import DenseMLP, MoEBlock, RoutingCapture
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEModelConfig, idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = (MLAttention if cfg.mla is not None else Attention)(cfg, idx, rotary)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_multiplier = cfg.residual_multiplier
        self.is_moe = cfg.sparse_layers[idx]
        if self.is_moe:
            self.moe = MoEBlock(cfg, idx)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, bias=cfg.mlp_bias)
        self.fused_norms = False  # Triton RMSNorm (+ residual add), set by MoEForCausalLM.set_kernels

    def forward(self, x, cos_sin, meta, cache, capture, positions=None):
        if self.fused_norms:  # residual_multiplier == 1 (set_kernels checks)
            from models.kernels.triton_ops import rmsnorm

            a = self.attn(rmsnorm(x, self.input_norm.weight, self.input_norm.eps)[0], cos_sin, meta, cache, positions)
            h, x = rmsnorm(a, self.post_attn_norm.weight, self.post_attn_norm.eps, residual=x)  # x += a; h = norm(x)
        else:
            h = self.attn(self.input_norm(x), cos_sin, meta, cache, positions)
            x = x + (h * self.residual_multiplier if self.residual_multiplier != 1.0 else h)
            h = self.post_attn_norm(x)
        h = self.moe(h, capture) if self.is_moe else self.mlp(h)
        return x + (h * self.residual_multiplier if self.residual_multiplier != 1.0 else h)


class MoEForCausalLM(nn.Module):
    def __init__(self, cfg: MoEModelConfig):
        super().__init__()
        self.config = cfg
        rot_dim = cfg.mla.qk_rope_head_dim if cfg.mla is not None else (cfg.rotary_dim or cfg.head_dim)
        self.rotary = RotaryEmbedding(rot_dim, cfg.rope_theta, cfg.rope_scaling, cfg.extra.get("hf_config"))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.kernels: KernelConfig | None = None  # set_kernels; KernelConfig() at the first forward
        self.packed_lm_head: PackedWeight | None = None

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.moe for layer in self.layers if layer.is_moe]

    def restore_fp32_modules(self) -> "MoEForCausalLM":
        """Modules whose reference keeps float32 weights in any dtype (routers of DeepSeek, GLM,
        ERNIE, MiniMax) go back to float32 after a `.to(dtype)`."""
        for module in self.modules():
            if getattr(module, "keep_fp32", False):
                module.float()
        return self

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary frequencies) after `to_empty`."""
        self.rotary.reset_parameters()

    def set_kernels(self, kernels: KernelConfig) -> None:
        """Choose every layer's kernels for the model's current device and dtype (the layers
        resolve `KernelConfig()` on first use when this is never called)."""
        self.kernels = kernels
        dev, dtype = self.embed.weight.device, self.embed.weight.dtype
        for layer in self.layers:
            layer.fused_norms = kernels.use_fused_ops(dev) and layer.residual_multiplier == 1.0
            if isinstance(layer.attn, Attention):  # MLA layers have their own decode path
                layer.attn.set_kernels(kernels, dev, dtype)
            if layer.is_moe:
                layer.moe.set_kernels(kernels, dev, dtype)
        # CPU: packed copies (cpu_linear) of the LM head, q/k/v, o and the experts' gate+up weights;
        # the C experts kernel's packed copy of w13 and w2 ("cpu" backend)
        loops = [b for b in self.moe_blocks() if b.moe_backend == "loop"]
        kernel_blocks = [b for b in self.moe_blocks() if b.moe_backend == "cpu"]
        gqa = [layer.attn for layer in self.layers if isinstance(layer.attn, Attention)]
        extra = sum(t.numel() * t.element_size() for t in
                    [self.lm_head.weight] + [w for a in gqa for w in (a.qkv.weight, a.o_proj.weight)]
                    + [b.w13 for b in loops]
                    + [w for b in kernel_blocks for w in (b.w13, b.w13, b.w2)])  # + gate+up for "loop" batches
        pack = kernels.pack_cpu_weights(dev, dtype, extra)
        if not pack and kernels.moe == "auto":  # the C kernel needs its packed copy: over budget, loop
            for b in kernel_blocks:
                b.moe_backend = "loop"
            loops, kernel_blocks = loops + kernel_blocks, []
        cache = self.__dict__.setdefault("_packed", {})  # kept across calls: packing costs a pass over the weight

        layout = kernels.cpu_linear_layout()

        def cached(key, make):
            if key not in cache:
                cache[key] = make()
            return cache[key]

        def packed(weight, index=None):
            return cached((id(weight), index, layout), lambda: PackedWeight(weight, index, layout=layout))

        self.packed_lm_head = packed(self.lm_head.weight) if pack else None
        for attn in gqa:
            attn.packed_qkv = packed(attn.qkv.weight) if pack else None
            attn.packed_o = packed(attn.o_proj.weight) if pack else None
        for b in self.moe_blocks():
            # a "cpu" block runs large batches (prefill) through the loop: it gets both copies
            b.packed_w13 = ([packed(b.w13, e) for e in range(b.num_experts)]
                            if pack and (b in loops or b in kernel_blocks) else None)
            b.packed_experts = (cached((id(b.w13), id(b.w2)), lambda: PackedExperts(b.w13, b.w2))
                                if b in kernel_blocks else None)

    def kernel_backends(self) -> dict[str, list[str]]:
        """The resolved backend of every layer: {"attention": [...], "moe": [...]}."""
        if self.kernels is None:
            self.set_kernels(KernelConfig())
        return {"attention": [getattr(layer.attn, "decode_backend", "mla") for layer in self.layers],
                "moe": [b.moe_backend for b in self.moe_blocks()]}

    def decode_is_sync_free(self) -> bool:
        """Whether a decode-only forward reads nothing back to the host (so a CUDA graph can
        capture it): sync-free kernels everywhere and no experts placed on other devices."""
        backends = self.kernel_backends()
        return (all(b in SYNC_FREE_BACKENDS for b in backends["attention"] + backends["moe"])
                and all(b.executor is None for b in self.moe_blocks()))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        capture: RoutingCapture | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, hidden]."""
        if self.kernels is None:
            self.set_kernels(KernelConfig())
        x = self.embed(input_ids)  # [T, hidden]
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, cos_sin, meta, cache, capture, positions)
        if self.layers and self.layers[0].fused_norms:
            from models.kernels.triton_ops import rmsnorm

            return rmsnorm(x, self.norm.weight, self.norm.eps)[0]
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        if self.kernels is None:
            self.set_kernels(KernelConfig())
        if self.packed_lm_head is not None:
            logits = packed_linear(hidden, self.packed_lm_head, self.lm_head.bias)
        else:
            logits = self.lm_head(hidden)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits.float()

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per layer, the shapes of its cache pair: (K, V) for GQA, (latent, rotary key) for MLA."""
        cfg = self.config
        if cfg.mla is not None:
            lat, pe = (num_blocks, block_size, 1, cfg.mla.kv_lora_rank), (num_blocks, block_size, 1, cfg.mla.qk_rope_head_dim)
            return [(lat, pe)] * cfg.num_layers
        kv = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return [(kv, kv)] * cfg.num_layers

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, device=None
    ) -> list[KVCache]:
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        return [(torch.zeros(a, dtype=dtype, device=device), torch.zeros(b, dtype=dtype, device=device))
                for a, b in self.kv_cache_shapes(num_blocks, block_size)]

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        elem = torch.empty((), dtype=dtype or self.embed.weight.dtype).element_size()
        return block_size * self.config.kv_bytes_per_token(elem)
