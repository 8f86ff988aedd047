"""One model config for every supported MoE family, read from a Hugging Face checkpoint.

The dataclasses here are plain data (this module imports nothing of the project);
`models/hf_config.py` fills them from a checkpoint's `config.json`: the fields every family
shares, then each family's own options (`models/<family>.py`, `config_fields`) and the helpers
below for the ones several families read the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "ntk_alpha")
ROPE_STYLES = ("neox", "interleaved")
QK_NORMS = (None, "head", "full", "l2")
LAYER_KINDS = ("attention", "linear", "mamba", "kda")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2/V3): K and V come from a compressed latent."""

    q_lora_rank: int | None  # None: q is one projection of the hidden state
    kv_lora_rank: int  # width of the cached latent
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # the decoupled rotary part, one key head shared by all heads
    v_head_dim: int

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"MLA {name}={getattr(self, name)} must be positive")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class DSAConfig:
    """DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): a lightning indexer scores the cached
    tokens with its own small heads, and each query's MLA attends only to its `topk` best."""

    n_heads: int
    head_dim: int  # the index key cached per token beside MLA's latent and rotary key
    topk: int
    rope_style: str = "neox"  # the rotary on the index q/k's first qk_rope_head_dim dims
    # per layer: True where the layer reuses the previous indexer layer's choice (GLM-5 "shared")
    shared: tuple[bool, ...] = ()

    def __post_init__(self):
        for name in ("n_heads", "head_dim", "topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedModelError(f"DSA {name}={value!r} must be a positive integer")
        if self.shared and self.shared[0]:
            raise UnsupportedModelError("DSA: the first layer cannot reuse a previous layer's top-k")

    def has_indexer(self, layer: int) -> bool:
        return not (self.shared and self.shared[layer])


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): a linear-attention layer whose state per sequence is
    a short-convolution window and a [v_heads, k_dim, v_dim] recurrent matrix, not a KV cache."""

    num_k_heads: int
    num_v_heads: int  # a multiple of num_k_heads (each key head serves a group of value heads)
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int  # causal depthwise convolution width over q, k and v

    def __post_init__(self):
        for name in ("num_k_heads", "num_v_heads", "k_head_dim", "v_head_dim", "conv_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedModelError(f"linear attention {name}={value!r} must be a positive integer")
        if self.num_v_heads % self.num_k_heads:
            raise UnsupportedModelError(f"linear attention: {self.num_k_heads} key heads do not divide "
                                        f"{self.num_v_heads} value heads")

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def state_bytes(self, elem: int) -> int:
        """One sequence's state in one layer: the convolution window in the model dtype (`elem`
        bytes a value), the recurrent matrix in float32."""
        return self.conv_dim * (self.conv_kernel - 1) * elem + self.num_v_heads * self.k_head_dim * self.v_head_dim * 4


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba2 (Granite 4.0-H): a selective state-space layer whose state per sequence is the
    causal depthwise convolution's window over [x | B | C] and a [heads, head_dim, state_size]
    SSM state, not a KV cache."""

    num_heads: int
    head_dim: int
    state_size: int  # d_state, the size of B and C per group
    n_groups: int  # B and C are shared by num_heads / n_groups heads each
    conv_kernel: int  # causal depthwise convolution width over x, B and C
    chunk_size: int  # the chunked (SSD) scan's chunk length in prefill
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj / out_proj biases
    time_step_limit: tuple[float, float] = (0.0, float("inf"))  # dt clamp of the chunked scan

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedModelError(f"mamba {name}={value!r} must be a positive integer")
        if self.num_heads % self.n_groups:
            raise UnsupportedModelError(f"mamba: {self.n_groups} groups do not divide {self.num_heads} heads")

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def state_bytes(self, elem: int) -> int:
        """One sequence's state in one layer: the convolution window in the model dtype (`elem`
        bytes a value), the SSM state in float32."""
        return self.conv_dim * (self.conv_kernel - 1) * elem + self.num_heads * self.head_dim * self.state_size * 4


@dataclass(frozen=True)
class KDAConfig:
    """Kimi Delta Attention (Kimi Linear): a gated delta rule whose decay is per key channel, not
    per head. Its state per sequence is the short-convolution window over q, k and v and a
    [heads, head_dim, head_dim] recurrent matrix."""

    num_heads: int
    head_dim: int  # q, k and v heads alike
    conv_kernel: int  # causal depthwise convolution width over q, k and v

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "conv_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedModelError(f"KDA {name}={value!r} must be a positive integer")

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return 3 * self.key_dim

    def state_bytes(self, elem: int) -> int:
        """One sequence's state in one layer: the convolution window in the model dtype (`elem`
        bytes a value), the recurrent matrix in float32."""
        return self.conv_dim * (self.conv_kernel - 1) * elem + self.num_heads * self.head_dim**2 * 4


@dataclass(frozen=True)
class RouterConfig:
    """How router logits become (top-k ids, weights); see `models/layers/router.py`."""

    scoring: str = "softmax"  # softmax (over experts) | sigmoid | softmax_topk (over the top-k logits)
    correction_bias: bool = False  # e_score_correction_bias: added to the scores for the choice only
    n_group: int = 1  # group-limited top-k: experts split in n_group groups ...
    topk_group: int = 1  # ... of which only the best topk_group are eligible
    group_score: str = "max"  # a group's score: its best expert (max) or its best two summed (top2_sum)
    scaling_factor: float = 1.0  # routed_scaling_factor, applied to the final weights
    renorm_min: float = 0.0  # renormalisation divides by max(sum, renorm_min)
    bias: bool = False  # the router projection has a bias (gpt-oss)
    fp32: bool = False  # router logits computed in float32 from a float32 weight

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid", "softmax_topk"):
            raise UnsupportedModelError(f"router scoring {self.scoring!r} is not supported")
        if self.group_score not in ("max", "top2_sum"):
            raise UnsupportedModelError(f"router group score {self.group_score!r} is not supported")
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise UnsupportedModelError(f"invalid expert groups: n_group={self.n_group}, topk_group={self.topk_group}")


@dataclass(frozen=True)
class MoEModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # non-default rope settings (type, factor, ...)
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (MLA: on q_a / kv_a)
    o_bias: bool  # bias on the output projection
    qk_norm: str | None  # None | "head" (per head, Qwen3) | "full" (whole projection, OLMoE) | "l2" (Llama 4)
    clip_qkv: float | None
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int  # 0: no shared expert
    shared_expert_gate: bool  # sigmoid gate on the shared expert (Qwen2-MoE)
    dense_intermediate_size: int  # for non-MoE layers (mlp_only_layers)
    sparse_layers: tuple[bool, ...]  # per layer: MoE block (True) or dense MLP (False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # -- attention variants --------------------------------------------------------------
    mla: MLAConfig | None = None  # Multi-head Latent Attention instead of GQA
    dsa: DSAConfig | None = None  # DeepSeek Sparse Attention over MLA (an index key cached per token)
    # hybrid models: per layer "attention", "linear" (Gated DeltaNet, `linear_attention`), "mamba"
    # (Mamba2, `mamba`) or "kda" (Kimi Delta Attention, `kda`); () all attention
    layer_kinds: tuple[str, ...] = ()
    linear_attention: LinearAttentionConfig | None = None
    mamba: Mamba2Config | None = None
    kda: KDAConfig | None = None  # sizes of "kda" layers (Kimi Delta Attention, Kimi Linear)
    attn_output_gate: bool = False  # attention output times sigmoid(a per-head gate from q_proj) (Qwen3-Next)
    rope_style: str = "neox"  # neox (rotate halves) | interleaved (rotate pairs: DeepSeek, Llama 4, ERNIE)
    rotary_dim: int | None = None  # rotary part of each head (partial rotary); None: all of it
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    sliding_windows: tuple[int | None, ...] = ()  # per layer: keys within this many positions; () none
    attention_chunks: tuple[int | None, ...] = ()  # per layer: attend within fixed chunks (Llama 4); () none
    nope_layers: tuple[bool, ...] = ()  # per layer: no rotary embedding (Llama 4 NoPE); () none
    attn_temperature: tuple[float, float] | None = None  # (floor_scale, attn_scale) on NoPE layers (Llama 4)
    attention_sinks: bool = False  # a learned per-head logit in every softmax (gpt-oss)
    qk_norm_after_rope: bool = False  # the per-head q/k norm applies after rotary (HunYuan), not before
    # -- MoE variants --------------------------------------------------------------------
    router: RouterConfig = RouterConfig()
    expert_bias: bool = False  # experts carry biases (gpt-oss)
    swiglu_limit: float | None = None  # clamped SwiGLU (gpt-oss): clamp limit ...
    swiglu_alpha: float = 1.702  # ... and sigmoid slope
    expert_input_scaling: bool = False  # routing weight scales the expert's input, not output (Llama 4)
    mlp_bias: bool = False  # bias on dense and shared-expert MLPs
    zero_experts: int = 0  # LongCat: router ids num_experts.. are zero-computation experts (identity)
    moe_shortcut: bool = False  # LongCat: an MoE layer's block runs beside its dense MLP and adds in one layer later
    # -- whole-model multipliers (Granite) -----------------------------------------------
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by this
    lm_head_bias: bool = False  # ERNIE with use_bias
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        sizes = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                 "top_k", "moe_intermediate_size", "max_position_embeddings"]
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UnsupportedModelError(f"{name}={value!r} in the config: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_key_value_heads={self.num_kv_heads} does not divide "
                                        f"num_attention_heads={self.num_heads}")
        n = self.num_layers
        for name in ("sparse_layers", "sliding_windows", "attention_chunks", "nope_layers", "layer_kinds"):
            value = getattr(self, name)
            if value and len(value) != n:
                raise UnsupportedModelError(f"{name} has {len(value)} entries for {n} layers")
        if any(k not in LAYER_KINDS for k in self.layer_kinds):
            raise UnsupportedModelError(f"layer kinds {sorted(set(self.layer_kinds) - set(LAYER_KINDS))} are not "
                                        f"supported (known: {', '.join(LAYER_KINDS)})")
        for kind in sorted(set(self.layer_kinds) - {"attention"}):
            if self.state_config(kind) is None:
                raise UnsupportedModelError(f"{kind!r} layers need their settings ({kind} layer sizes missing)")
        if self.mla is not None and set(self.layer_kinds) & {"linear", "mamba"}:
            raise UnsupportedModelError("Gated DeltaNet or Mamba2 layers beside MLA are not supported yet")
        if self.dsa is not None:
            if self.mla is None or self.mla.q_lora_rank is None:
                raise UnsupportedModelError("DeepSeek Sparse Attention needs MLA with a q_lora_rank")
            if self.dsa.rope_style not in ROPE_STYLES or self.dsa.head_dim < self.mla.qk_rope_head_dim:
                raise UnsupportedModelError(f"DSA index heads of {self.dsa.head_dim} ({self.dsa.rope_style} rotary) "
                                            f"cannot hold the rotary part of {self.mla.qk_rope_head_dim}")
            if self.dsa.shared and len(self.dsa.shared) != self.num_layers:
                raise UnsupportedModelError(f"DSA shared layers have {len(self.dsa.shared)} entries for "
                                            f"{self.num_layers} layers")
        if self.rope_style not in ROPE_STYLES:
            raise UnsupportedModelError(f"rope style {self.rope_style!r} is not supported")
        if self.qk_norm not in QK_NORMS:
            raise UnsupportedModelError(f"qk norm {self.qk_norm!r} is not supported")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise UnsupportedModelError(f"rotary_dim={self.rotary_dim} must be even and in (0, {self.head_dim}]")
        if self.top_k > self.num_experts + self.zero_experts:
            raise UnsupportedModelError(f"invalid MoE settings: num_experts={self.num_experts}, top_k={self.top_k}")
        if not any(self.sparse_layers):
            raise UnsupportedModelError("no layer of this config has an MoE block: not a mixture-of-experts model")
        dense = not all(self.sparse_layers)
        if dense and (not isinstance(self.dense_intermediate_size, int) or self.dense_intermediate_size < 1):
            raise UnsupportedModelError(f"intermediate_size={self.dense_intermediate_size!r} in the config: the dense "
                                        f"layers need a positive integer")
        r = self.router
        if self.num_experts % r.n_group:
            raise UnsupportedModelError(f"n_group={r.n_group} does not divide num_experts={self.num_experts}")
        if r.topk_group * (self.num_experts // r.n_group) < self.top_k:
            raise UnsupportedModelError(f"topk_group={r.topk_group} of {r.n_group} groups leaves fewer than "
                                        f"top_k={self.top_k} experts")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.sparse_layers)

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def attention_chunk(self, layer: int) -> int | None:
        return self.attention_chunks[layer] if self.attention_chunks else None

    def uses_rope(self, layer: int) -> bool:
        return not (self.nope_layers and self.nope_layers[layer])

    def layer_kind(self, layer: int) -> str:
        """"attention" (a paged KV cache) or a stateful kind, "linear", "mamba" or "kda" (a
        per-sequence recurrent state)."""
        return self.layer_kinds[layer] if self.layer_kinds else "attention"

    @property
    def hybrid(self) -> bool:
        """Some layers keep a per-sequence recurrent state instead of KV."""
        return any(k != "attention" for k in self.layer_kinds)

    def state_bytes_per_sequence(self, elem: int) -> int:
        """Recurrent-state bytes one sequence keeps over all its stateful layers (0 without any),
        the model dtype taking `elem` bytes a value (each kind's `state_bytes`)."""
        if not self.hybrid:
            return 0
        return sum(self.state_config(k).state_bytes(elem) for k in self.layer_kinds if k != "attention")

    def state_config(self, kind: str):
        """The sizes of a stateful layer kind (each has `state_bytes(elem)`)."""
        return {"linear": self.linear_attention, "mamba": self.mamba, "kda": self.kda}[kind]

    def kv_elements_per_token(self, layer: int) -> int:
        """Cached values per token in one layer: the latent and rotary key (MLA) or K and V (none
        for a linear-attention layer: its state does not grow with the sequence)."""
        if self.layer_kind(layer) != "attention":
            return 0
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim + self.index_key_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def index_key_dim(self) -> int:
        """The DSA index key cached per token and layer beside the rotary key (0 without DSA;
        every layer's cache has room for it, shared-indexer layers leave it unused)."""
        return self.dsa.head_dim if self.dsa is not None else 0

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        """KV-cache bytes one token takes over all layers, at `elem_bytes` per value."""
        return elem_bytes * sum(self.kv_elements_per_token(i) for i in range(self.num_layers))


def rope_type_of(params: dict[str, Any] | None) -> str:
    """A rope settings dict's type. HunYuan's "dynamic" with a fixed `alpha` does not depend on the
    length (transformers calls it ntk_alpha): theta * alpha ** (d / (d - 2))."""
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    return "ntk_alpha" if rope_type == "dynamic" and params.get("alpha") else rope_type


def rope_settings(hf: Any) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the transformers-5 `rope_parameters` or the older fields."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = rope_type_of(params)
        scaling = None if rope_type == "default" else dict(params)
    else:
        theta = getattr(hf, "rope_theta", 10000.0)
        scaling = getattr(hf, "rope_scaling", None)
        rope_type = rope_type_of(scaling)
        scaling = None if rope_type == "default" else dict(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return float(theta), scaling


def partial_rotary_dim(hf: Any, head_dim: int) -> int | None:
    """Rotary width when only part of each head rotates (GLM-4.5, MiniMax-M2); None: all of it."""
    params = getattr(hf, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0
    dim = int(head_dim * factor)
    return None if dim >= head_dim else dim


def hybrid_layer_kinds(hf: Any, num_layers: int, linear_kind: str) -> tuple[str, ...]:
    """A hybrid config's `layer_types` (linear_attention / full_attention, as Qwen3-Next and Kimi
    Linear name them) as our layer kinds, the linear layers being `linear_kind`."""
    kinds = []
    for i, t in enumerate(getattr(hf, "layer_types", None) or []):
        if t not in ("linear_attention", "full_attention"):
            raise UnsupportedModelError(f"layer_types[{i}]={t!r} is not supported (linear_attention, full_attention)")
        kinds.append(linear_kind if t == "linear_attention" else "attention")
    if len(kinds) != num_layers:
        raise UnsupportedModelError(f"layer_types has {len(kinds)} entries for {num_layers} layers")
    return tuple(kinds)


def layer_windows(hf: Any, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window: the config's `sliding_window` on the layers `layer_types` marks
    `sliding_attention` (all layers when it has no `layer_types`); () when no layer slides."""
    window = getattr(hf, "sliding_window", None)
    if getattr(hf, "use_sliding_window", True) is False or not window:
        return ()
    if window >= getattr(hf, "max_position_embeddings", 0):
        return ()  # never narrower than the context: plain causal attention
    types = getattr(hf, "layer_types", None)
    if types is None:
        return (int(window),) * num_layers
    out = tuple(int(window) if t == "sliding_attention" else None for t in types[:num_layers])
    return out if any(w is not None for w in out) else ()
