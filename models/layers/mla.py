"""Multi-head Latent Attention (DeepSeek-V2/V3) over a paged cache of latents.

Per token the cache holds only the normalised KV latent `c` (kv_lora_rank values) and the
rotary key part `k_pe` (qk_rope_head_dim values, one head shared by all heads): a layer's cache
is the pair `(latent [num_blocks, block_size, 1, kv_lora_rank], k_pe [num_blocks, block_size,
1, qk_rope_head_dim])`, so the runner's (k, v) pair handling applies unchanged. Per-head K and V
are never cached: `kv_b_proj` maps a latent to them.

DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5; `cfg.dsa`): a lightning indexer (its own small
heads from the q latent, one key per token from the hidden state, cached in the rotary key's row
after `k_pe`) scores every cached token for every query, sum over heads of w_h relu(q_h . k);
each query then attends only to its `topk` best (with fewer tokens in its context, to all of
them). GLM-5's "shared" layers have no indexer and reuse the previous indexer layer's choice.

- Decode uses the absorbed-weights form: with W_uk / W_uv the key / value halves of
  `kv_b_proj`, q_nope . (W_uk c) = (W_uk^T q_nope) . c, so each query head is moved into latent
  space once and attends over the cached latents directly (a single shared "KV head" of width
  kv_lora_rank + rope); the latent-space output goes through W_uv afterwards. The plan's kernel
  (models/kernels/mla_decode.py: Triton on CUDA, C on the CPU) reads the latent blocks in place
  with no host sync; the PyTorch path ("reference", and DSA layers) gathers the blocks.
- Prefill chunks expand their context's latents through `kv_b_proj` (K = [k_nope, k_pe],
  V) and attend causally; the cached contexts of all the step's continuing chunks are read from
  the cache in one indexed read and expanded in one matmul. With a kernel, a chunk that continues a cached
  context with few queries (fewer than `absorb_max_queries`, where the absorbed form costs fewer
  multiply-adds than expanding the whole context) runs its queries as rows of the decode kernel
  instead (each with its causal length): nothing gathered, nothing expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels.mla_decode import absorbed_weights, mla_decode
from models.kernels.packed import PackedWeight, packed_linear
from models.kernels.plan import AttentionKernel, LayerKernels
from models.layers.norm import RMSNorm
from models.layers.paged import NO_SCALES, AttentionMetadata, KVCache, KVScales, gather_kv, kv_roundtrip, load_kv, write_rows
from models.layers.rotary import RotaryEmbedding, rotate

MLA_NORM_EPS = 1e-6  # DeepSeek's q_a / kv_a norms use the RMSNorm default, not rms_norm_eps


class MLAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        m = cfg.mla
        self.layer_idx = layer_idx
        self.num_heads = H = cfg.num_heads
        self.rank, self.nope, self.rope, self.v_dim = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.qk_dim = m.qk_head_dim
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.qk_dim**-0.5
        self.rope_style = cfg.rope_style
        self.use_rope = cfg.uses_rope(layer_idx)  # Kimi Linear's MLA: no rotary, the "rope" part passes as is
        hidden = cfg.hidden_size
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = RMSNorm(m.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(hidden, self.rank + self.rope, bias=cfg.qkv_bias)  # -> [latent, k_pe]
        self.kv_a_norm = RMSNorm(self.rank, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)  # latent -> [k_nope, v]
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=cfg.o_bias)
        self.rotary = rotary
        self.decode_kernel: AttentionKernel | None = None  # the plan's (REFERENCE: the PyTorch path)
        self.packed: dict[str, PackedWeight] = {}  # projection name -> its packed copy (apply_kernels)
        self.absorbed: tuple[torch.Tensor, torch.Tensor] | None = None  # (W_uk, W_uv^T), apply_kernels
        # kv_b_proj's weight kept in a checkpoint's quantized format (models/quant/weights.QParam; the
        # parameter a meta shape): dequantized per call where a full weight is needed (transient)
        self.kv_b_q = None
        self.kv_b_cpu: bool | None = None  # kv_b kept in fp8 on the CPU: the C fp8 kernel (the plan's choice)
        # prefill continuations with fewer queries run as decode-kernel rows: below this many the
        # absorbed form, (2r + dr) multiply-adds per query and key and head, costs less than
        # expanding the context, r (dn + dv) per key and head, then (dqk + dv) per query and key
        extra = 2 * self.rank + self.rope - (self.qk_dim + self.v_dim)
        self.absorb_max_queries = self.rank * (self.nope + self.v_dim) // extra if extra > 0 else 1 << 30
        self.dsa = cfg.dsa
        if cfg.dsa is not None and cfg.dsa.has_indexer(layer_idx):
            self.indexer = Indexer(cfg)
        # an fp8 latent cache's scale (--kv-cache-dtype fp8; models/kv_cache_dtype.py): the latent and
        # the rotary row share kv_scales[0] (one entry in vLLM's MLA cache); 1.0 unless the checkpoint has it
        self.kv_scales: KVScales = NO_SCALES

    # the projections the plan may pack (LayerKernels.qkv; o_proj: LayerKernels.o)
    PACKED = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj")

    def apply_kernels(self, kernels: LayerKernels, packed_qkv: dict[str, PackedWeight | None] | None = None,
                      packed_o: PackedWeight | None = None) -> None:
        """The plan's decode kernel and the packed copies of the projections (`packed_qkv`: by
        name, those of `PACKED`; None or a None entry: that projection runs `F.linear`)."""
        self.packed = {n: w for n, w in (packed_qkv or {}).items() if w is not None}
        if packed_o is not None:
            self.packed["o_proj"] = packed_o
        self.decode_kernel = kernels.attention
        self.absorbed = (None if kernels.attention == AttentionKernel.REFERENCE or self.kv_b_q is not None
                         else absorbed_weights(self.kv_b_proj.weight, self.num_heads, self.nope, self.v_dim))

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight [H * (dn + dv), r]: the parameter, or its quantized copy dequantized for this call."""
        return self.kv_b_proj.weight if self.kv_b_q is None else self.kv_b_q.q.dequant(dtype)

    def _kv_b(self, latent: torch.Tensor) -> torch.Tensor:
        if self.kv_b_q is None:
            return self.kv_b_proj(latent)
        from models.quant.ops import qlinear

        return qlinear(latent, self.kv_b_q.q, cpu=self.kv_b_cpu)

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Projection `name` of x, over its packed copy where the plan gave one."""
        lin = getattr(self, name)
        w = self.packed.get(name)
        return lin(x) if w is None else packed_linear(x, w, lin.bias)

    @property
    def _kernel(self) -> AttentionKernel | None:
        """The decode kernel where one serves this layer (not DSA's sparse selection)."""
        k = self.decode_kernel
        return k if k not in (None, AttentionKernel.REFERENCE) and self.dsa is None and (
            self.absorbed or self.kv_b_q is not None) else None

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk, W_uv^T): the views apply_kernels made, remade if the weight moved since (`.to`);
        of the dequantized weight, per call, when kv_b_proj is kept quantized."""
        if self.kv_b_q is not None:
            return absorbed_weights(self._kv_b_weight(self.kv_a_norm.weight.dtype), self.num_heads, self.nope,
                                    self.v_dim)
        w_uk, w_uv_t = self.absorbed
        if w_uk.data_ptr() != self.kv_b_proj.weight.data_ptr():
            self.absorbed = absorbed_weights(self.kv_b_proj.weight, self.num_heads, self.nope, self.v_dim)
        return self.absorbed

    def forward(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata, cache: KVCache,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        q_lat = None if hasattr(self, "q_proj") else self.q_a_norm(self._proj("q_a_proj", x))
        q = self._proj("q_proj", x) if q_lat is None else self._proj("q_b_proj", q_lat)
        q_nope, q_pe = q.view(T, H, self.qk_dim).split([self.nope, self.rope], dim=-1)  # [T, H, dn], [T, H, dr]
        latent, k_pe = self._proj("kv_a_proj", x).split([self.rank, self.rope], dim=-1)  # [T, r], [T, dr]
        latent = self.kv_a_norm(latent)[:, None, :]  # [T, 1, r]
        k_pe = k_pe[:, None, :]  # [T, 1, dr]
        if self.use_rope:
            cos, sin = cos_sin
            q_pe = rotate(q_pe, cos, sin, self.rope_style)
            k_pe = rotate(k_pe, cos, sin, self.rope_style)
        lat_cache, pe_cache = cache
        ks = self.kv_scales[0]
        # a bfloat16 / fp8 cache stores the entries converted (fp8: / ks, saturated)
        write_rows(lat_cache, latent, meta.slot_mapping, ks)
        width = pe_cache.shape[-1]  # dr, + the DSA index key
        if width == self.rope:
            write_rows(pe_cache, k_pe, meta.slot_mapping, ks)
        else:  # k_pe then the index key (zeros in layers without an indexer)
            idx_q = idx_k = None
            if hasattr(self, "indexer"):
                idx_q, idx_k, idx_w = self.indexer.project(x, q_lat, cos, sin)
            row = torch.cat((k_pe, (idx_k if idx_k is not None else k_pe.new_zeros(T, width - self.rope))[:, None]),
                            dim=-1)
            write_rows(pe_cache, row, meta.slot_mapping, ks)
            if idx_k is not None:  # the indexer scores what the cache holds
                idx_k = kv_roundtrip(idx_k, pe_cache.dtype, ks)
        if lat_cache.dtype != latent.dtype:  # prefill attends what the cache holds, as decode and later chunks do
            latent, k_pe = kv_roundtrip(latent, lat_cache.dtype, ks), kv_roundtrip(k_pe, pe_cache.dtype, ks)
        sparse = self.dsa is not None
        chosen = None  # DSA: per scheduled sequence, the [n, L] tokens its queries attend to
        if sparse:
            if hasattr(self, "indexer"):
                chosen = self.indexer.select(idx_q, idx_w, idx_k, cache, meta, ks)
                meta.dsa_selection = chosen
            else:
                chosen = meta.dsa_selection

        out = q.new_empty(T, H, self.v_dim)
        nd = meta.num_decodes
        kernel = self._kernel
        if nd:
            if kernel is not None:
                w_uk, w_uv_t = self._absorbed()
                out[:nd] = mla_decode(q_nope[:nd], q_pe[:nd], w_uk, w_uv_t, lat_cache, pe_cache,
                                      meta.block_tables[:nd], meta.decode_seq_lens, self.scale, kernel, ks)
            else:
                out[:nd] = self._decode(q_nope[:nd], q_pe[:nd], cache, meta.block_tables[:nd], meta.decode_seq_lens,
                                        chosen[0] if sparse else None)
        if meta.num_seqs > nd:
            self._prefills(out, q_nope, q_pe, latent[:, 0], k_pe[:, 0], cache, meta, chosen, kernel)
        return self._proj("o_proj", out.view(T, H * self.v_dim))

    def _prefills(self, out, q_nope, q_pe, latent, k_pe, cache: KVCache, meta: AttentionMetadata, chosen,
                  kernel: AttentionKernel | None) -> None:
        """The step's prefill chunks into `out`: short continuations as decode-kernel rows (with a
        kernel), the others expanded, their cached contexts read in one indexed read."""
        nd, loc, dev = meta.num_decodes, meta.query_start_loc, q_nope.device
        lat_cache, pe_cache = cache
        rows: list[int] = []  # chunks run as absorbed rows
        expand: list[int] = []  # chunks expanded over a context read from the cache
        for i in range(nd, meta.num_seqs):
            n, L = loc[i + 1] - loc[i], meta.seq_lens[i]
            if L == n:
                continue  # no cached prefix: the new latents are the whole context
            (rows if kernel is not None and n < self.absorb_max_queries else expand).append(i)
        if rows:  # each query a row: its sequence's blocks, its causal length
            seq = [i for i in rows for _ in range(loc[i], loc[i + 1])]
            lens = [meta.seq_lens[i] - (loc[i + 1] - loc[i]) + 1 + j for i in rows for j in range(loc[i + 1] - loc[i])]
            tok = torch.tensor([t for i in rows for t in range(loc[i], loc[i + 1])], device=dev)
            w_uk, w_uv_t = self._absorbed()
            out[tok] = mla_decode(q_nope[tok], q_pe[tok], w_uk, w_uv_t, lat_cache, pe_cache,
                                  meta.block_tables[torch.tensor(seq, device=dev)],
                                  torch.tensor(lens, dtype=torch.int32, device=dev), self.scale, kernel,
                                  self.kv_scales[0])
        ctx: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if expand:  # one indexed read of every expanded chunk's context: slot = block * bs + offset
            bs = lat_cache.shape[1]
            lens_t = torch.tensor([meta.seq_lens[i] for i in expand], device=dev)
            pos = torch.arange(int(sum(meta.seq_lens[i] for i in expand)), device=dev)
            starts = torch.cumsum(lens_t, 0) - lens_t
            which = torch.repeat_interleave(torch.arange(len(expand), device=dev), lens_t)
            pos = pos - starts[which]
            blocks = meta.block_tables[torch.tensor(expand, device=dev)][which, pos // bs]
            slots = blocks * bs + pos % bs
            ks, dt = self.kv_scales[0], q_nope.dtype
            kv_all = self._kv_b(load_kv(self._rows(lat_cache, slots), ks, dt))  # one matmul
            pe_all = load_kv(self._rows(pe_cache, slots)[:, : self.rope], ks, dt)
            off = 0
            for i in expand:
                L = meta.seq_lens[i]
                ctx[i] = (kv_all[off: off + L], pe_all[off: off + L])
                off += L
        for i in range(nd, meta.num_seqs):
            if i in rows:
                continue
            s, e = loc[i], loc[i + 1]
            kv, pe = ctx[i] if i in ctx else (self._kv_b(latent[s:e]), k_pe[s:e])
            out[s:e] = self._prefill(q_nope[s:e], q_pe[s:e], kv, pe, chosen[1][i - nd] if chosen is not None else None)

    @staticmethod
    def _rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The cache rows at flat `slots`: [n, width] in the cache's dtype (an fp8 cache's selected
        as bytes: index_select has no float8 kernel on the CPU)."""
        rows = cache.view(-1, cache.shape[-1])
        if rows.dtype == torch.float8_e4m3fn:
            return rows.view(torch.uint8).index_select(0, slots).view(rows.dtype)
        return rows.index_select(0, slots)

    def _prefill(self, q_nope, q_pe, kv: torch.Tensor, pe: torch.Tensor, chosen: torch.Tensor | None = None):
        """n queries over a context of L >= n tokens (the last n are theirs), its latents expanded
        through `kv_b_proj` (kv [L, H * (dn + dv)]) -> [n, H, dv]; `chosen` [n, L] (DSA): the
        tokens each query may attend to."""
        n, H = q_nope.shape[:2]
        L = kv.shape[0]
        kv = kv.view(L, H, self.nope + self.v_dim)  # [L, H, dn + dv]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, pe[:, None, :].expand(L, H, self.rope)), dim=-1)  # [L, H, dqk]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [n, H, dqk]
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if L == n and chosen is None:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale)
        else:
            qpos = torch.arange(L - n, L, device=q.device)[:, None]
            kpos = torch.arange(L, device=q.device)[None, :]
            mask = kpos <= qpos if chosen is None else (kpos <= qpos) & chosen
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale)
        return o[0].transpose(0, 1)  # [n, H, dv]

    def _decode(self, q_nope, q_pe, cache: KVCache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                chosen: torch.Tensor | None = None):
        """Absorbed form, one query per sequence: q_nope [B, H, dn], q_pe [B, H, dr] -> [B, H, dv];
        `chosen` [B, L] (DSA): the cached tokens each sequence's query may attend to."""
        B, H = q_nope.shape[:2]
        w = self._kv_b_weight(q_nope.dtype).view(H, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, dn, r], [H, dv, r]
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope, w_uk)  # [B, H, r]
        qk = torch.cat((q_lat, q_pe), dim=-1)[:, None]  # [B, 1, H, r + dr]: the heads as the query axis
        lat_cache, pe_cache = cache
        bs = lat_cache.shape[1]
        nblocks = (int(seq_lens.max()) + bs - 1) // bs
        tables = block_tables[:, :nblocks]  # [B, nblocks]
        ks, dt = self.kv_scales[0], q_nope.dtype  # a bfloat16 / fp8 cache read back in the model dtype
        lat = load_kv(lat_cache[tables].flatten(1, 2), ks, dt)  # [B, L, 1, r]
        pe = load_kv(pe_cache[tables].flatten(1, 2)[..., : self.rope], ks, dt)
        keys = torch.cat((lat, pe), dim=-1)  # [B, L, 1, r + dr]
        pos = torch.arange(keys.shape[1], device=q_nope.device)
        valid = pos[None, :] < seq_lens[:, None]  # [B, L]
        if chosen is not None:
            valid = valid & chosen[:, : valid.shape[1]]
        mask = valid[:, None, None, :]  # [B, 1, 1, L]
        o_lat = F.scaled_dot_product_attention(qk, keys.transpose(1, 2), lat.transpose(1, 2), attn_mask=mask,
                                               scale=self.scale)  # [B, 1, H, r]
        return torch.einsum("bhr,hvr->bhv", o_lat[:, 0], w_uv)  # [B, H, dv]



class Indexer(nn.Module):
    """The DSA lightning indexer of one layer: which cached tokens each query attends to."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.dsa
        self.n_heads, self.head_dim, self.topk, self.rope_style = d.n_heads, d.head_dim, d.topk, d.rope_style
        self.rope = cfg.mla.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.mla.q_lora_rank, d.n_heads * d.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, d.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(d.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, d.n_heads, bias=False)

    def project(self, x: torch.Tensor, q_lat: torch.Tensor, cos, sin):
        """Index queries [T, heads, d], index keys [T, d] (rotary on their first dims) and the
        heads' weights [T, heads] (float32)."""
        T = x.shape[0]
        q = rotate(self.wq_b(q_lat).view(T, self.n_heads, self.head_dim), cos, sin, self.rope_style)
        k = rotate(self.k_norm(self.wk(x))[:, None, :], cos, sin, self.rope_style)[:, 0]
        w = self.weights_proj(x).float() * self.n_heads**-0.5
        return q, k, w

    def _scores(self, q, w, keys) -> torch.Tensor:
        """q [n, heads, d], w [n, heads], keys [..., L, d] -> [n, L]: sum_h w_h relu(q_h . k / sqrt(d))."""
        s = torch.relu(torch.einsum("nhd,nld->nhl", q.float(), keys.float().expand(q.shape[0], -1, -1))
                       * self.head_dim**-0.5)
        return torch.einsum("nh,nhl->nl", w, s)

    def _top(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The `topk` best valid tokens of each row (all valid ones when fewer) as a mask."""
        scores = scores.masked_fill(~valid, float("-inf"))
        k = min(self.topk, scores.shape[-1])
        chosen = torch.zeros_like(valid).scatter_(-1, scores.topk(k, dim=-1).indices, True)
        return chosen & valid

    def select(self, q, w, k_new, cache: KVCache, meta: AttentionMetadata, k_scale: float = 1.0):
        """(decodes' [B, L] mask or None, [each prefill chunk's [n, L] mask]); `k_scale`: an fp8
        cache's scale."""
        width = cache[1].shape[-1]
        nd = meta.num_decodes
        decode = None
        if nd:
            pe_cache = cache[1]
            bs = pe_cache.shape[1]
            seq_lens = meta.decode_seq_lens
            nblocks = (int(seq_lens.max()) + bs - 1) // bs
            keys = pe_cache[meta.block_tables[:nd, :nblocks]].flatten(1, 2)[:, :, 0, self.rope : width]  # [B, L, d]
            keys = load_kv(keys, k_scale, torch.float32)
            per_head = torch.relu(torch.einsum("bhd,bld->bhl", q[:nd].float(), keys.float()) * self.head_dim**-0.5)
            scores = torch.einsum("bh,bhl->bl", w[:nd], per_head)
            pos = torch.arange(keys.shape[1], device=q.device)
            decode = self._top(scores, pos[None, :] < seq_lens[:, None])
        chunks = []
        loc = meta.query_start_loc
        for i in range(nd, meta.num_seqs):
            s, e = loc[i], loc[i + 1]
            n, L = e - s, meta.seq_lens[i]
            if L == n:
                keys = k_new[s:e]
            else:
                keys = gather_kv(cache, meta.block_tables[i], L, (k_scale, k_scale), k_new.dtype)[1][:, 0, self.rope : width]
            scores = self._scores(q[s:e], w[s:e], keys[None])
            qpos = torch.arange(L - n, L, device=q.device)[:, None]
            chunks.append(self._top(scores, torch.arange(L, device=q.device)[None, :] <= qpos))
        return decode, chunks
