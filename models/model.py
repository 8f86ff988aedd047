"""The decoder stack shared by every supported MoE family.

Families differ only in their config (attention kind and variants per layer, routing, expert
variants, dense layers, multipliers) and in their checkpoint names (see `models/<family>.py`
mapping tables); the compute is here and in `models/layers`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from models.config import MoEModelConfig
from models.kernels.packed import (PackedExperts, PackedWeight, QTensorExperts, QTensorLinear, QuantizedExperts,
                                   QuantizedLinear, packed_linear)
from models.kernels.flags import KernelFlags
from models.kernels.plan import KernelPlan, LinearLayout, MoEKernel, quantized_groups, resolve_plan
from models.kernels.plan import fp8_linears_on_cpu
from models.kernels.quant import QuantWeight
from models.quant.weights import QParam
from models.layers.attention import Attention
from models.layers.paged import AttentionMetadata, KVCache
from models.layers.kda import KimiDeltaAttention
from models.layers.linear_attention import GatedDeltaNet
from models.layers.mamba2 import Mamba2Mixer
from models.layers.mla import MLAttention
from models.layers.moe import DenseMLP, MoEBlock, RoutingCapture
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding
from models.layers.shortcut import ShortcutDecoderLayer


# layer kind (MoEModelConfig.layer_kinds) -> the token mixer that keeps a per-sequence state
# instead of KV: built as cls(cfg, layer_idx); `state_shapes(num_slots)` gives its state tensors as
# ((shape, dtype or None for the model dtype), ...) and its forward takes them as the layer's cache
STATE_MIXERS: dict[str, type[nn.Module]] = {"linear": GatedDeltaNet, "mamba": Mamba2Mixer, "kda": KimiDeltaAttention}


def fused_ops(plan: KernelPlan) -> tuple:
    """(rmsnorm, add_rmsnorm, rope_write_kv) for the layers the plan fuses: the C ops on the CPU
    (KernelPlan.fused_ops "cpu"; registered with the C kernels the plan found), else the Triton
    ops; three Nones when the plan fuses nothing."""
    if plan.fused_ops is None:
        return (None, None, None)
    ops = torch.ops.moe_serve
    if plan.fused_ops == "cpu":
        return (ops.rmsnorm_cpu, ops.add_rmsnorm_cpu, ops.rope_write_kv_cpu)
    from models.kernels import triton_ops  # noqa: F401 - registers torch.ops.moe_serve.*_triton

    return (ops.rmsnorm_triton, ops.add_rmsnorm_triton, ops.rope_write_kv_triton)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEModelConfig, idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        kind = cfg.layer_kind(idx)
        if kind != "attention":  # a recurrent state per sequence instead of KV
            self.attn = STATE_MIXERS[kind](cfg, idx)
        else:
            self.attn = (MLAttention if cfg.mla is not None else Attention)(cfg, idx, rotary)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.residual_multiplier = cfg.residual_multiplier
        self.is_moe = cfg.sparse_layers[idx]
        if self.is_moe:
            self.moe = MoEBlock(cfg, idx)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, bias=cfg.mlp_bias)
        self.fused_norms = False  # RMSNorm (+ residual add) in one op: the kernel plan's choice
        self.norm_ops: tuple = ()  # (rmsnorm, add_rmsnorm): Triton's or the C ops (KernelPlan.fused_ops)

    def forward(self, x, cos_sin, meta, cache, capture, positions=None):
        if self.fused_norms:  # residual_multiplier == 1 (the plan checks)
            rmsnorm, add_rmsnorm = self.norm_ops
            a = self.attn(rmsnorm(x, self.input_norm.weight, self.input_norm.eps), cos_sin, meta, cache, positions)
            # x += a; h = norm(x)
            h, x = add_rmsnorm(a, x, self.post_attn_norm.weight, self.post_attn_norm.eps)
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
        layer_cls = ShortcutDecoderLayer if cfg.moe_shortcut else DecoderLayer  # LongCat: layers/shortcut.py
        self.layers = nn.ModuleList(layer_cls(cfg, i, self.rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.kernel_plan: KernelPlan | None = None  # apply_plan (models.build.load_model applies one)
        self.packed_lm_head: PackedWeight | None = None
        self._packed: dict[tuple, PackedWeight | PackedExperts] = {}  # kept across plans: packing reads a weight
        # EAGLE-3 drafts (models/eagle3.py): the residual stream entering these layers is kept in
        # `aux_hidden` by each forward ([T, hidden] per layer, in order); () keeps nothing
        self.aux_hidden_layers: tuple[int, ...] = ()
        self.aux_hidden: list[torch.Tensor] = []
        # --quantization: parameter name -> its only copy, quantized (the parameter: a shape on the meta device)
        self.quantized: dict[str, QuantWeight] = {}
        # what the paged KV cache stores (--kv-cache-dtype, models/kv_cache_dtype.py): None is the
        # model dtype; float8_e4m3fn with each attention layer's kv_scales
        self.kv_cache_dtype: torch.dtype | None = None
        # a quantized checkpoint's weights kept in their format, or --quantization fp8: parameter name ->
        # its only copy (models/quant/weights.py; the parameter: a shape on the meta device)
        self.qweights: dict[str, QParam] = {}

    def qtensor_candidates(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """{parameter name: (shape, whether it carries a bias column)} of the weights the engine can
        run kept in a checkpoint's quantized format (`models.quant.ops`): q/k/v and o (GQA), MLA's
        projections (kv_b too: dequantized per call where the absorbed decode splits it), expert
        stacks, shared experts, dense MLPs, an untied LM head."""
        out: dict[str, tuple[tuple[int, ...], bool]] = {}
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, DecoderLayer):  # LongCat's shortcut layers: not wired
                continue
            attn, p = layer.attn, f"layers.{i}"
            names = []
            if isinstance(attn, MLAttention):
                names += [f"attn.{n}.weight" for n in attn.PACKED if hasattr(attn, n)] + [
                    "attn.o_proj.weight", "attn.kv_b_proj.weight"]
            elif hasattr(attn, "qkv"):
                names += ["attn.qkv.weight", "attn.o_proj.weight"]
            if layer.is_moe:
                names += ["moe.w13", "moe.w2"]
                if layer.moe.shared is not None:
                    names += ["moe.shared.w13.weight", "moe.shared.w2.weight"]
            else:
                names += ["mlp.w13.weight", "mlp.w2.weight"]
            for n in names:
                param = self.get_parameter(f"{p}.{n}")
                bias = n.startswith("moe.w") and layer.moe.variant is not None and layer.moe.variant.bias
                out[f"{p}.{n}"] = (tuple(param.shape), bias)
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = (tuple(self.lm_head.weight.shape), False)
        return out

    def weight_formats(self) -> dict[str, str]:
        """{parameter name: WeightFormat} of the parameters kept in a quantized checkpoint format."""
        return {n: q.fmt.value for n, q in self.qweights.items()}

    def weight_bytes(self) -> dict[str, int]:
        """The engine's own accounting of its resident weights: `quantized` (the QTensors' and
        --quantization int8/int4's tensors), `float` (every other parameter, once: tied ones count
        once, meta shapes not at all), `experts_linears` (the expert stacks and linears the engine can
        run quantized: quantized or float, as they are held) and `total`."""
        quantized = sum(q.q.nbytes for q in self.qweights.values()) + sum(q.nbytes for q in self.quantized.values())
        floats = sum(p.numel() * p.element_size() for p in self.parameters() if p.device.type != "meta") + sum(
            q.nbytes - q.q.nbytes for q in self.qweights.values())  # gpt-oss's expert biases beside their QTensors
        linears = 0
        for name in self.qtensor_candidates():
            if name in self.qweights:
                linears += self.qweights[name].nbytes
            elif name in self.quantized:
                linears += self.quantized[name].nbytes
            else:
                p = self.get_parameter(name)
                linears += p.numel() * p.element_size()
        return {"quantized": quantized, "float": floats, "experts_linears": linears, "total": quantized + floats}

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.moe for layer in self.layers if layer.is_moe]

    def restore_fp32_modules(self) -> MoEForCausalLM:
        """Modules whose reference keeps float32 weights in any dtype (routers of DeepSeek, GLM,
        ERNIE, MiniMax) go back to float32 after a `.to(dtype)`."""
        for module in self.modules():
            if getattr(module, "keep_fp32", False):
                module.float()
        return self

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary frequencies) after `to_empty`."""
        self.rotary.reset_parameters()

    def apply_plan(self, plan: KernelPlan) -> None:
        """Give every layer its kernels from `plan` (models/kernels/plan.py) and the packed weight
        copies it asks for (made on first use; kept across plans for the same weight)."""
        if len(plan.layers) != len(self.layers):
            raise ValueError(f"a plan for {len(plan.layers)} layers applied to a model of {len(self.layers)}")

        quantized = {id(p): self.quantized[n] for n, p in self.named_parameters(remove_duplicate=False)
                     if n in self.quantized}
        kept = {id(p): self.qweights[n] for n, p in self.named_parameters(remove_duplicate=False)
                if n in self.qweights}

        # the kept weights run the Triton kernels where the plan runs the experts kept with them so
        q_triton = True if kept and any(lk.moe == MoEKernel.TRITON for lk in plan.layers) else None
        # on the CPU the kept fp8 linears run the C fp8 kernel where the plan has the C kernels (models.quant.ops)
        q_cpu = fp8_linears_on_cpu(plan.capabilities)

        def quant(weight: torch.Tensor) -> QuantWeight:
            if id(weight) not in quantized:
                raise ValueError("the plan asks for quantized weights the model does not hold (load it with "
                                 "load_model(..., quantization=...))")
            return quantized[id(weight)]

        def packed(weight: torch.Tensor, layout: LinearLayout, index: int | None = None) -> PackedWeight | None:
            if id(weight) in kept:  # whatever the layout: its only copy is quantized
                return QTensorLinear(kept[id(weight)], triton=q_triton, cpu=q_cpu)
            if layout == LinearLayout.PLAIN:
                return None
            if layout == LinearLayout.QUANTIZED:
                return QuantizedLinear(quant(weight))
            key = (id(weight), index, layout)
            if key not in self._packed:
                self._packed[key] = PackedWeight(weight, layout, index)
            return self._packed[key]

        ops = fused_ops(plan)
        for layer, lk in zip(self.layers, plan.layers):
            layer.fused_norms, layer.norm_ops = lk.fused_norms, ops[:2]
            attn = layer.attn
            qkv = packed(attn.qkv.weight, lk.qkv) if hasattr(attn, "qkv") else None
            o = packed(attn.o_proj.weight, lk.o) if hasattr(attn, "qkv") else None
            if isinstance(attn, MLAttention):  # its projections by name (MLAttention.PACKED)
                attn.kv_b_q = kept.get(id(attn.kv_b_proj.weight))
                attn.kv_b_cpu = q_cpu
                qkv = {n: packed(getattr(attn, n).weight, lk.qkv) for n in attn.PACKED if hasattr(attn, n)}
                o = packed(attn.o_proj.weight, lk.o)
            attn.apply_kernels(lk, qkv, o)
            attn.rope_op = ops[2] if lk.fused_rope else None
            if layer.is_moe:
                b = layer.moe
                w13 = ([packed(b.w13, lk.gate_up, e) for e in range(b.num_experts)]
                       if lk.gate_up != LinearLayout.PLAIN else None)
                experts: PackedExperts | None = None
                if id(b.w13) in kept:
                    w13 = None
                    experts = QTensorExperts(kept[id(b.w13)], kept[id(b.w2)], triton=lk.moe == MoEKernel.TRITON,
                                             cpu=lk.moe == MoEKernel.CPU)
                elif id(b.w13) in quantized:
                    experts = QuantizedExperts(quant(b.w13), quant(b.w2))
                elif MoEKernel.CPU in (lk.moe, lk.moe_large):
                    key = (id(b.w13), id(b.w2))
                    experts = self._packed.setdefault(key, PackedExperts(b.w13, b.w2, bias=b.variant is not None
                                                                         and b.variant.bias))
                b.apply_kernels(lk, plan, w13, experts)
                if b.shared is not None:
                    w13s, w2s = packed(b.shared.w13.weight, lk.shared), packed(b.shared.w2.weight, lk.shared)
                    b.shared.packed = (w13s, w2s) if w13s is not None and w2s is not None else None
            elif hasattr(layer, "mlp") and (id(layer.mlp.w13.weight) in kept or lk.mlp == LinearLayout.QUANTIZED):
                layer.mlp.packed = (packed(layer.mlp.w13.weight, lk.mlp),  # a dense layer's MLP
                                    packed(layer.mlp.w2.weight, lk.mlp))
        self.packed_lm_head = packed(self.lm_head.weight, plan.lm_head)
        self.kernel_plan = plan

    def plan_kernels(self, flags: KernelFlags | None = None) -> KernelPlan:
        """Resolve the kernel plan for the model's device and dtype and `flags` (default: all
        "auto"), apply it and return it."""
        fmts = {q.fmt for q in self.quantized.values()}
        plan = resolve_plan(self.config, self.embed.weight.device, self.embed.weight.dtype, flags,
                            quantization=fmts.pop() if fmts else None,
                            quantized_groups=quantized_groups(self.quantized) if self.quantized else None,
                            weight_formats=self.weight_formats())
        if fmts:  # several formats (a GGUF file's): the plan's bytes are the weights' own
            plan = replace(plan, quantized_bytes=sum(q.nbytes for q in self.quantized.values()))
        plan = self.with_weight_bytes(plan)
        self.apply_plan(plan)
        return plan

    def with_weight_bytes(self, plan: KernelPlan) -> KernelPlan:
        """`plan` with the resident weight bytes this model holds (`weight_bytes`)."""
        counted = self.weight_bytes()
        return replace(plan, weight_bytes=counted["total"],
                       quantized_bytes=counted["quantized"] if self.qweights else plan.quantized_bytes)

    def _check_plan(self) -> None:
        if self.kernel_plan is None:
            raise RuntimeError("the model has no kernel plan: load it with models.load_model, or "
                               "apply_plan(resolve_plan(...)) first")

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        capture: RoutingCapture | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm: [T, hidden]. Callers run it without autograd (the
        engine's runner in inference mode; `load_model` turns gradients off); a traced region
        (torch.compile) holds no inference-mode switch of its own."""
        self._check_plan()
        x = self.embed(input_ids)  # [T, hidden]
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        shortcut = None  # moe_shortcut: the MoE output one layer hands to the next
        aux = self.aux_hidden_layers
        if aux:
            self.aux_hidden = []
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            if aux and i in aux:
                self.aux_hidden.append(x)
            if self.config.moe_shortcut:
                x, shortcut = layer(x, cos_sin, meta, cache, capture, positions, shortcut)
            else:
                x = layer(x, cos_sin, meta, cache, capture, positions)
        if self.layers and self.layers[0].fused_norms:
            return self.layers[0].norm_ops[0](x, self.norm.weight, self.norm.eps)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        self._check_plan()
        if self.packed_lm_head is not None:
            logits = packed_linear(hidden, self.packed_lm_head, self.lm_head.bias)
        else:
            logits = self.lm_head(hidden)
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits.float()

    def kv_layers(self) -> list[int]:
        """The layers with a paged KV cache (the others, linear attention, keep state slots)."""
        return [i for i in range(self.config.num_layers) if self.config.layer_kind(i) == "attention"]

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of an attention layer's cache pair: (K, V) for GQA, (latent, rotary key) for MLA."""
        cfg = self.config
        if cfg.mla is not None:
            # the rotary key's row also holds the DSA index key (DeepSeek-V3.2, GLM-5)
            return ((num_blocks, block_size, 1, cfg.mla.kv_lora_rank),
                    (num_blocks, block_size, 1, cfg.mla.qk_rope_head_dim + cfg.index_key_dim))
        kv = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return kv, kv

    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_state_slots: int = 0,
                          dtype: torch.dtype | None = None, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer its cache pair: the paged KV blocks of an attention layer, or the
        `num_state_slots` state slots of a linear-attention layer (the convolution window in the
        model dtype, the recurrent matrix in float32). The KV blocks take `kv_cache_dtype` where
        one is set (--kv-cache-dtype fp8), the state slots never do."""
        dtype = dtype or self.embed.weight.dtype
        kv_dtype = self.kv_cache_dtype or dtype
        device = device or self.embed.weight.device
        kv_shapes = self.kv_cache_shapes(num_blocks, block_size)
        caches = []
        for i, layer in enumerate(self.layers):
            if self.config.layer_kind(i) != "attention":
                caches.append(tuple(torch.zeros(shape, dtype=state_dtype or dtype, device=device)
                                    for shape, state_dtype in layer.attn.state_shapes(num_state_slots)))
            else:
                caches.append(tuple(torch.zeros(s, dtype=kv_dtype, device=device) for s in kv_shapes))
        return caches

    def state_bytes_per_sequence(self, dtype: torch.dtype | None = None) -> int:
        """What one sequence's state slot takes over all linear-attention layers (0 without any)."""
        elem = torch.empty((), dtype=dtype or self.embed.weight.dtype).element_size()
        return self.config.state_bytes_per_sequence(elem)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        """One block's bytes over all attention layers, in `dtype` (default: the KV-cache dtype)."""
        elem = torch.empty((), dtype=dtype or self.kv_cache_dtype or self.embed.weight.dtype).element_size()
        return block_size * self.config.kv_bytes_per_token(elem)
