"""GGUF files for the tests, written from a transformers checkpoint the way llama.cpp's
convert_hf_to_gguf.py writes them (and llama-quantize's block formats): the `gguf` package's
GGUFWriter and its quantizer, llama.cpp's tensor names and metadata keys, the q/k row permutation
of llama-architecture models, experts stacked per layer, and the tokenizer as metadata (a
byte-level BPE vocabulary: `tokenizer.ggml.model` gpt2, the gpt-2 pre-tokenizer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

ARCH = {"MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe",
        "OlmoeForCausalLM": "olmoe", "DeepseekV2ForCausalLM": "deepseek2", "DeepseekV3ForCausalLM": "deepseek2",
        "GptOssForCausalLM": "gpt-oss"}
Q = gguf.GGMLQuantizationType
# names as llama.cpp's converter writes them (gguf-py tensor_mapping), for the families above
_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
    # DeepSeek-V2/V3
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", r"blk.\1.attn_q_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", r"blk.\1.attn_q_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"blk.\1.attn_q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight", r"blk.\1.attn_kv_a_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", r"blk.\1.attn_kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", r"blk.\1.attn_kv_b.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    # gpt-oss
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", r"blk.\1.attn_output.bias"),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", r"blk.\1.attn_sinks.weight"),
    (r"model\.layers\.(\d+)\.mlp\.router\.(weight|bias)", r"blk.\1.ffn_gate_inp.\2"),
]
_GPT_OSS_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|"
                     r"down_proj)\.weight")
_EXPERT_NAME = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time reordering of q/k rows for llama-architecture models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf_dir: Path, split_kv_b: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, GGUF name -> float32 array) of a transformers checkpoint, as llama.cpp converts it
    (DeepSeek's kv_b split into k_b and v_b as newer llama.cpp does, unless `split_kv_b` is false)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    arch = ARCH[cfg["architectures"][0]]
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in sd.items():
        if m := _EXPERT.fullmatch(name):
            experts.setdefault((int(m[1]), _EXPERT_NAME[m[3]]), {})[int(m[2])] = t
            continue
        if m := _GPT_OSS_EXPERTS.fullmatch(name):  # gate/up interleaved along the last dim; [E, in, out]
            blk, bias = f"blk.{m[1]}", bool(m[3])
            if m[2] == "down_proj":
                out[f"{blk}.ffn_down_exps.{'bias' if bias else 'weight'}"] = t if bias else t.swapaxes(1, 2)
            else:
                t = t if bias else t.swapaxes(1, 2)  # [E, 2I(, H)]
                suffix = "bias" if bias else "weight"
                out[f"{blk}.ffn_gate_exps.{suffix}"], out[f"{blk}.ffn_up_exps.{suffix}"] = t[:, 0::2], t[:, 1::2]
            continue
        for pattern, repl in _NAMES:
            if re.fullmatch(pattern, name):
                gname = re.sub(pattern, repl, name)
                break
        else:
            raise KeyError(f"no GGUF name for {name}")
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"]
            t = permute(t, heads)
        if gname.endswith("ffn_gate_inp_shexp.weight"):
            t = t.reshape(-1)  # llama.cpp's tensor is [n_embd]
        if arch == "gpt-oss":
            gname = gname.replace(".ffn_norm.", ".post_attention_norm.")
        if gname.endswith("attn_kv_b.weight") and split_kv_b:  # [H * (nope + v), rank] -> k_b^T, v_b
            heads, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
            kv = t.reshape(heads, nope + cfg["v_head_dim"], t.shape[-1])
            out[gname.replace("kv_b", "k_b")] = np.ascontiguousarray(kv[:, :nope].swapaxes(1, 2))
            out[gname.replace("kv_b", "v_b")] = np.ascontiguousarray(kv[:, nope:])
            continue
        out[gname] = t
    for (layer, kind), per_expert in experts.items():
        out[f"blk.{layer}.ffn_{kind}_exps.weight"] = np.stack([per_expert[e] for e in sorted(per_expert)])
    return cfg, out


def tensor_type(name: str, t: np.ndarray, qtype) -> Q:
    """llama-quantize's choice for a pure --pure quantization: 2-D+ weights with rows of whole
    blocks in `qtype`, norms, routers and 1-D tensors in F32."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return qtype if t.ndim >= 2 and "ffn_gate_inp" not in name else Q.F32
    if t.ndim < 2 or "ffn_gate_inp" in name or "norm" in name or t.shape[-1] % 32 or not name.endswith(".weight"):
        return Q.F32
    return qtype


def write_gguf(hf_dir: Path, path: Path, qtype=Q.F32, tokenizer_dir: Path | None = None,
               types: dict[str, Q] | None = None, arch: str | None = None, tokenizer: bool = True,
               split_kv_b: bool = True, drop: tuple[str, ...] = (), extra=None, fuse: bool = False) -> dict[str, Q]:
    """Write `hf_dir` (a transformers checkpoint) as the GGUF file `path`, weights in `qtype`
    (`types`: per-tensor overrides); the tokenizer of `tokenizer_dir` (default: hf_dir) as metadata
    unless `tokenizer` is false; without the tensors `drop`; `extra(writer)` adds metadata; `fuse`:
    gate/up experts and q/k/v fused as llama.cpp's --fuse-gate-up-exps / --fuse-qkv write them.
    Returns the type of each tensor written."""
    cfg, tensors = gguf_tensors(hf_dir, split_kv_b)
    src = ARCH[cfg["architectures"][0]]
    arch = arch or src  # another name: a file of an architecture the importer refuses
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(hf_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(cfg["num_attention_heads"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    if rope.get("rope_type") == "yarn":  # as the converter's TextModel writes it
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_expert_count(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if src == "deepseek2":  # DeepseekV2Model.set_gguf_parameters: MLA written as MQA
        w.add_head_count_kv(1)
        if cfg.get("n_group") is not None:
            w.add_expert_group_count(cfg["n_group"])
            w.add_expert_group_used_count(cfg["topk_group"])
        rank, rope_dim = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        w.add_key_length(rank + rope_dim)
        w.add_value_length(rank)
        w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(cfg["v_head_dim"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
        if cfg.get("q_lora_rank"):
            w.add_q_lora_rank(cfg["q_lora_rank"])
        w.add_kv_lora_rank(rank)
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
        if cfg.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(cfg["routed_scaling_factor"])
        if cfg.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope_dim)
        if rope.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    else:
        w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if src != "gpt-oss":
            w.add_rope_dimension_count(head_dim)
    if src == "gpt-oss":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_sliding_window(cfg["sliding_window"])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
    elif src == "llama":
        w.add_feed_forward_length(cfg["intermediate_size"])
    elif src == "olmoe":
        w.add_feed_forward_length(cfg["intermediate_size"])
        if cfg.get("clip_qkv"):
            w.add_clamp_kqv(cfg["clip_qkv"])
    elif src != "deepseek2":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if src == "qwen3moe" or (src not in ("deepseek2", "gpt-oss") and cfg.get("norm_topk_prob")):
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", True)))
    if tokenizer:
        add_tokenizer(w, tokenizer_dir or hf_dir)
    if extra is not None:
        extra(w)
    if fuse:  # convert_hf_to_gguf.py --fuse-gate-up-exps --fuse-qkv
        for name in [n for n in tensors if n.endswith("ffn_gate_exps.weight")]:
            tensors[name.replace("gate_exps", "gate_up_exps")] = np.concatenate(
                [tensors.pop(name), tensors.pop(name.replace("gate", "up"))], axis=1)
        for name in [n for n in tensors if ".attn_q." in n]:
            tensors[name.replace("attn_q", "attn_qkv")] = np.concatenate(
                [tensors.pop(name.replace("attn_q", f"attn_{k}")) for k in "qkv"], axis=0)
    written = {}
    for name, t in tensors.items():
        if name in drop:
            continue
        qt = (types or {}).get(name) or tensor_type(name, t, qtype)
        if qt == Q.F32:
            w.add_tensor(name, t.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif qt == Q.I32:
            w.add_tensor(name, t.astype(np.int32))
        elif qt == Q.Q6_K:  # the gguf package has no quantizer for it: random blocks of the tensor's scale
            w.add_tensor(name, q6_k_blocks(t), raw_dtype=qt)
        elif qt == Q.Q4_K:  # nor for this one
            w.add_tensor(name, q4_k_blocks(t), raw_dtype=qt)
        else:
            w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), qt), raw_dtype=qt)
        written[name] = qt
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def q6_k_blocks(t: np.ndarray, seed: int = 0) -> np.ndarray:
    """Valid Q6_K blocks (210 bytes per 256 weights: 4+2-bit values, int8 scales per 16, fp16 d
    last) of random values about as large as `t`'s: a K-quant tensor for the loader's dequantizing path."""
    rng = np.random.default_rng(seed)
    *lead, K = t.shape
    nb = K // 256
    blocks = rng.integers(0, 256, size=(*lead, nb, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 32, size=(*lead, nb, 16), dtype=np.int8).view(np.uint8)
    d = (np.abs(t).max() / (32 * 32)).astype(np.float16)
    blocks[..., 208:210] = np.full((*lead, nb, 1), d, dtype=np.float16).view(np.uint8)
    return blocks.reshape(*lead, nb * 210)


def q4_k_blocks(t: np.ndarray, seed: int = 0) -> np.ndarray:
    """Valid Q4_K blocks (144 bytes per 256 weights: fp16 d and dmin, 12 bytes of 6-bit scales and
    minimums, 4-bit values) of random values about as large as `t`'s: every byte pattern of the
    scales and values is valid; d and dmin positive, sized so w = d*sc*q - dmin*mn spans about
    +-max|t| (sc, mn up to 63, q up to 15)."""
    rng = np.random.default_rng(seed)
    *lead, K = t.shape
    nb = K // 256
    blocks = rng.integers(0, 256, size=(*lead, nb, 144), dtype=np.uint8)
    top = float(np.abs(t).max())
    d = (top / (63 * 15) * rng.uniform(0.5, 2, size=(*lead, nb, 1))).astype(np.float16)
    dmin = (top / 63 * rng.uniform(0.5, 2, size=(*lead, nb, 1))).astype(np.float16)
    blocks[..., 0:2] = d.view(np.uint8)
    blocks[..., 2:4] = dmin.view(np.uint8)
    return blocks.reshape(*lead, nb * 144)


def add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, pre: str = "gpt-2") -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's converter stores it (`_set_vocab_gpt2`; `pre`:
    the pre-tokenizer name the converter recognised from the tokenizer's hash)."""
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    size = max(vocab.values()) + 1
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def dequantized_state_dict(path: Path, hf_dir: Path) -> dict[str, torch.Tensor]:
    """The transformers state dict a GGUF file stands for, from the `gguf` package's dequantizer
    (q/k rows un-permuted, experts unstacked): the reference weights. The tensors' bytes come from
    the importer's header reader (GGUFReader decodes the whole vocabulary: seconds per file), which
    test_gguf.py checks against GGUFReader."""
    from models.gguf_loader import GGUFFile

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[cfg["architectures"][0]]
    gg = {t.name: gguf.quants.dequantize(t.data.reshape(*t.shape[:-1], -1), t.ggml_type).reshape(t.shape)
          for t in GGUFFile(str(path)).tensors.values()}
    sd = {}
    for name, ref in load_file(str(hf_dir / "model.safetensors")).items():
        if m := _EXPERT.fullmatch(name):
            t = gg[f"blk.{m[1]}.ffn_{_EXPERT_NAME[m[3]]}_exps.weight"][int(m[2])]
        elif m := _GPT_OSS_EXPERTS.fullmatch(name):
            blk, suffix = f"blk.{m[1]}", "bias" if m[3] else "weight"
            if m[2] == "down_proj":
                t = gg[f"{blk}.ffn_down_exps.{suffix}"]
                t = t if m[3] else t.swapaxes(1, 2)
            else:
                gate, up = gg[f"{blk}.ffn_gate_exps.{suffix}"], gg[f"{blk}.ffn_up_exps.{suffix}"]
                t = np.stack([gate, up], axis=2).reshape(*gate.shape[:1], -1, *gate.shape[2:])  # re-interleave
                t = t if m[3] else t.swapaxes(1, 2)
        else:
            gname = next(re.sub(p, r, name) for p, r in _NAMES if re.fullmatch(p, name))
            if arch == "gpt-oss":
                gname = gname.replace(".ffn_norm.", ".post_attention_norm.")
            if gname.endswith("attn_kv_b.weight") and gname not in gg:
                k_b, v_b = gg[gname.replace("kv_b", "k_b")], gg[gname.replace("kv_b", "v_b")]
                t = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).reshape(ref.shape)
            else:
                t = gg[gname]
            if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"]
                t = t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        sd[name] = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).reshape(ref.shape)
    return sd
