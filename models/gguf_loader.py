"""GGUF import: a llama.cpp checkpoint (one `.gguf` file) -> our config and parameters.

`gguf_path(path)` says whether `--model` names a GGUF checkpoint (a `.gguf` file, or a directory
holding exactly one and no config.json). `GGUFCheckpoint` reads it (`GGUFFile`: the header parsed
here, the tensors left in a read-only memory map; the `gguf` package's types, block sizes and
dequantizer): the metadata (`<arch>.block_count`, `.embedding_length`, `.expert_count`, ...) becomes
the transformers config of the matching family, and so our `MoEModelConfig`; llama.cpp's tensor
names map onto the family's checkpoint names and from there onto our parameters (the family's
weight map), experts stacked per layer as llama.cpp stores them. Architectures: `llama` with
experts (Mixtral), `qwen2moe` (shared expert with its gate), `qwen3moe`, `olmoe`, `deepseek2`
(DeepSeek-V2, or V3 when the file has `exp_probs_b`: MLA, `attn_kv_b` whole or split into
`attn_k_b` / `attn_v_b`, shared experts, leading dense layers, YaRN) and `gpt-oss` (sinks, biases,
gate/up split out of its interleaved gate_up: `_gpt_oss_experts`). llama.cpp's optional fused
`attn_qkv` / `ffn_gate_up_exps` fill our fused weights (`_fused`).

llama.cpp's converter reorders the q/k rows of llama-architecture models (its rope pairs adjacent
elements, ours the two halves of a head): the rows are put back as they are read (whole rows, so
packed rows too).

Tensor formats (ggml types):
- F32 / F16 / BF16: loaded as float, in the model dtype;
- Q8_0 / Q4_0 / Q4_1 in the weight groups our quantized kernels run (q/k/v and o, experts, shared
  experts, LM head; `models/kernels/plan.py` `quantized_groups`): kept packed as `int8` / `int4` /
  `int4_zp` QuantWeights. Each block's values are the bytes of the file (the nibble order is
  ggml's: byte i of a block holds element i low and i + 16 high); the fp16 scales (and Q4_1
  minimums) are split out of the interleaved blocks into their own arrays once, at load. No float
  copy is made; the resident bytes equal the file's bytes of those tensors;
- Q4_K there: `int4_zp` groups of 32 (`_q4_k`: the 4-bit values as stored, each sub-block's
  d*sc and -dmin*mn rounded to float16 once: within 15|dd| + |dm| of the file's dequantization);
- MXFP4 there: `int8` groups of 32, exactly (`_mxfp4_int8`); gpt-oss's MXFP4 expert stacks (no int
  kernel for its variant experts) are kept as models/quant `mxfp4` QTensors, bit for bit (`_mxfp4`);
- other types the `gguf` package dequantizes (Q6_K, other K-quants, Q5_0/Q5_1, IQ*, TQ*):
  dequantized tensor by tensor at load, with a log line naming each, into `int8` inside a
  quantized group (Q6_K's groups of 16 with their own scales do not fit one scale per 32) and
  into float elsewhere;
- a packed tensor outside the quantized groups (token embeddings, routers, dense MLP layers, MLA's
  projections) is dequantized to float (logged); a fused weight whose parts come in different
  formats (q in Q4_0, v in Q8_0) is held in the widest of them, the others re-quantized into it
  (logged), and so is a layer's pair of expert stacks (the C experts kernel takes one format for
  w13 and w2);
- anything else (I8..I64, F64, types the package cannot dequantize) is refused, naming the type
  and the tensors.
The tokenizer comes from the file's metadata (`load_tokenizer`: transformers builds it from
`tokenizer.ggml.*`, the chat template from `tokenizer.chat_template`; DeepSeek's pre-tokenizer
splits, which transformers does not know, from `_PRE_SPLITS`), or from `--tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.config import MoEModelConfig, UnsupportedModelError
from models.kernels.plan import param_group
from models.kernels.quant import FORMATS, GROUP, QuantWeight
from models.loader import _names
from models.weight_map import WeightMap

if TYPE_CHECKING:
    from models.model import MoEForCausalLM

log = logging.getLogger(__name__)

# llama.cpp `general.architecture` -> the transformers architecture our families serve
ARCHITECTURES = {"llama": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
                 "qwen3moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 # V2 (softmax routing) or V3 (sigmoid with exp_probs_b): decided per file
                 "deepseek2": "DeepseekV2ForCausalLM", "gpt-oss": "GptOssForCausalLM"}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# ggml block type -> our packed format (the same block content: models/kernels/quant.py)
PACKED = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4_zp", "Q4_K": "int4_zp"}
# bytes of a 32-block: fp16 d [, fp16 m], values
_BLOCK = {"Q8_0": (34, 1), "Q4_0": (18, 1), "Q4_1": (20, 2)}
_WIDTH = {"int4": 0, "int4_zp": 1, "int8": 2}  # the widest format holds the others' values best
_CHUNK = 1 << 16  # super-blocks converted at a time (Q4_K: 16M weights)

# our names (family checkpoint names, transformers') -> llama.cpp's
_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"blk.\1.attn_\2_norm.weight"),
    (r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
    # DeepSeek-V2/V3 (MLA, shared experts, the router's correction bias)
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", r"blk.\1.attn_q_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", r"blk.\1.attn_q_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"blk.\1.attn_q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight", r"blk.\1.attn_kv_a_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", r"blk.\1.attn_kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", r"blk.\1.attn_kv_b.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    # gpt-oss (its experts: `_gpt_oss_experts`)
    (r"model\.layers\.(\d+)\.self_attn\.sinks", r"blk.\1.attn_sinks.weight"),
    (r"model\.layers\.(\d+)\.mlp\.router\.(weight|bias)", r"blk.\1.ffn_gate_inp.\2"),
]
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|"
                     r"down_proj)\.weight")
_EXPERT_KIND = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


# llama.cpp pre-tokenizers (`tokenizer.ggml.pre`) that transformers' GGUF builder does not know: the
# splits of llama-vocab.cpp (the regexes of the models' own tokenizer.json), applied in order, each
# piece kept, before the byte-level mapping
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "deepseek-v3": (
        '\\p{N}{1,3}',
        '[一-龥\u3040-ゟ゠-ヿ]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{'
        'P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\'
        'S)|\\s+',
    ),
    "deepseek-llm": (
        '[\r\n]',
        '\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-'
        'ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ'
        '-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ'
        '-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+',
        '\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+',
        '\\s+$',
        '[一-龥ࠀ-一가-\ud7ff]+',
        '\\p{N}+',
    ),
}


class GGUFError(UnsupportedModelError):
    pass


# GGUF metadata value types (gguf.GGUFValueType) -> numpy scalar type; 8 string, 9 array
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class TensorInfo:
    name: str
    kind: str  # the ggml type's name (Q4_0, F32, ...), or "type <id>" for one the gguf package does not know
    shape: tuple[int, ...]  # torch order (ggml lists dimensions innermost first)
    data: np.ndarray  # the tensor's bytes: a read-only view of the file's map
    ggml_type: Any = None  # gguf.GGMLQuantizationType


class GGUFFile:
    """The header of a GGUF file (metadata and tensor table) over a read-only memory map.

    The `gguf` package's GGUFReader decodes every metadata array into Python objects, the
    tokenizer's too (~1 s per 10k tokens and merges here: half a minute for a 150k vocabulary);
    this reader skips string arrays (their length is kept) and leaves the tensors in the map.
    Types, block sizes and dequantization are the gguf package's."""

    def __init__(self, path: str):
        import gguf

        self.map = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self.view = self.map.data  # a memoryview: struct reads the header from it
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            self.fields[key], pos = self._value(pos + 4, vtype)
        table = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            table.append((name, tuple(reversed(dims)), kind, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, kind, offset in table:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                self.tensors[name] = TensorInfo(name, f"type {kind}", shape, self.map[:0])
                continue
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
            if start + offset + nbytes > len(self.map):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = TensorInfo(name, qtype.name, shape, self.map[start + offset:start + offset + nbytes],
                                            qtype)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.view, pos)
        return bytes(self.view[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def _value(self, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype == 8:
            return self._string(pos)
        if vtype in _SCALARS:
            t = np.dtype(_SCALARS[vtype])
            return np.frombuffer(self.map, t, 1, pos)[0].item(), pos + t.itemsize
        if vtype != 9:
            raise ValueError(f"metadata value type {vtype}")
        etype, count = struct.unpack_from("<IQ", self.view, pos)
        pos += 12
        if etype in _SCALARS:
            t = np.dtype(_SCALARS[etype])
            return np.frombuffer(self.map, t, count, pos), pos + t.itemsize * count
        if etype == 8:  # strings (the vocabulary, merges): skipped, their count kept
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", self.view, pos)
                pos += 8 + n
            return SkippedStrings(count), pos
        raise ValueError(f"metadata array of type {etype}")


@dataclass
class SkippedStrings:
    count: int


def gguf_path(path: str) -> str | None:
    """The GGUF file `path` names (the file, or the only .gguf of a directory without a
    config.json); None for a Hugging Face checkpoint directory."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise GGUFError(f"{path}: {len(found)} .gguf files ({', '.join(found[:4])}); pass --model the one to load "
                        f"(split GGUF files are not supported: merge them with llama-gguf-split --merge)")
    return os.path.join(path, found[0]) if found else None


def tokenizer_source(path: str) -> tuple[str, dict[str, str]]:
    """(directory, keyword arguments) for `from_pretrained` of model `path`'s tokenizer: a GGUF
    checkpoint's is built from its metadata (`gguf_file=`)."""
    file = gguf_path(path)
    if file is None:
        return path, {}
    return os.path.dirname(os.path.abspath(file)), {"gguf_file": os.path.basename(file)}


def load_tokenizer(path: str) -> Any:
    """The tokenizer of model `path` (`AutoTokenizer`); a GGUF checkpoint's from its metadata (a fast
    tokenizer: transformers builds it from `tokenizer.ggml.*`), its
    control tokens (special in the file: `<|im_end|>`, ...) counted among the special ids as a
    tokenizer.json's added special tokens are (what `skip_special_tokens` leaves out)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory, kwargs = tokenizer_source(path)
    if not kwargs:
        return AutoTokenizer.from_pretrained(directory)
    # not AutoTokenizer: it reads the file's config too, refusing architectures transformers does not
    # load from GGUF (olmoe); the tokenizer needs only the `tokenizer.*` metadata
    name = kwargs["gguf_file"]
    fields = GGUFFile(os.path.join(directory, name)).fields
    if "tokenizer.ggml.tokens" not in fields or fields.get("tokenizer.ggml.model") in (None, "none"):
        raise GGUFError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens / .model): pass "
                        f"--tokenizer a directory holding one")
    tok = PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name)
    tokens = fields.get("tokenizer.ggml.tokens")
    n = tokens.count if isinstance(tokens, SkippedStrings) else len(tok)
    if len(tok) > n:
        # transformers' byte-level builder adds GPT-2's "<|endoftext|>" when the vocabulary lacks it:
        # an id past the model's embeddings that a prompt holding that text would reach. Dropped.
        from tokenizers import Tokenizer

        data = json.loads(tok.backend_tokenizer.to_str())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n]
        tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    pre = fields.get("tokenizer.ggml.pre")
    if fields.get("tokenizer.ggml.model") == "gpt2" and pre in _PRE_SPLITS:
        from tokenizers import Regex, pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = set(tok.all_special_ids)
    extra = [t.content for i, t in sorted(tok.added_tokens_decoder.items()) if t.special and i not in known]
    if extra:
        tok.add_special_tokens({"extra_special_tokens": list(getattr(tok, "extra_special_tokens", None) or [])
                                + extra})
    return tok


def _hf_name_to_gguf(name: str) -> tuple[str, bool]:
    """(llama.cpp's tensor name, whether it is an experts stack) of a family checkpoint name."""
    if m := _EXPERT.fullmatch(name):
        return f"blk.{m[1]}.ffn_{_EXPERT_KIND[m[2]]}_exps.weight", True
    for pattern, repl in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name), False
    raise GGUFError(f"no llama.cpp tensor name for {name}")


def _gpt_oss_experts(cfg: MoEModelConfig) -> dict[str, list[tuple[str, tuple]]]:
    """gpt-oss's experts as llama.cpp stores them (gate and up split out of gpt-oss's interleaved
    gate_up, each [E, I, H], down [E, H, I], and their biases [E, I] / [E, H]) -> our w13
    [E, 2I, H + 1] (gate rows, up rows, the bias as the last column) and w2 [E, H, I + 1]."""
    H, inter, all_ = cfg.hidden_size, cfg.moe_intermediate_size, slice(None)
    out: dict[str, list[tuple[str, tuple]]] = {}
    for i in range(cfg.num_layers):
        w13, w2, blk = f"layers.{i}.moe.w13", f"layers.{i}.moe.w2", f"blk.{i}"
        for kind, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter))):
            out[f"{blk}.ffn_{kind}_exps.weight"] = [(w13, (all_, rows, slice(0, H)))]
            out[f"{blk}.ffn_{kind}_exps.bias"] = [(w13, (all_, rows, H))]
        out[f"{blk}.ffn_down_exps.weight"] = [(w2, (all_, all_, slice(0, inter)))]
        out[f"{blk}.ffn_down_exps.bias"] = [(w2, (all_, all_, inter))]
    return out


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _unpermute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: rows (head, pair, 2) -> (head, 2, half). Any row width."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class GGUFCheckpoint:
    """A GGUF file, read (memory mapped) with the `gguf` package: its config and its tensors."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file: GGUFFile | None = GGUFFile(path)
        except Exception as e:  # noqa: BLE001 - a damaged or non-GGUF file: say which
            raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.fields = self.file.fields
        self.tensors = self.file.tensors
        if int(self.field("split.count", 1) or 1) > 1:
            raise GGUFError(f"{path}: one of {self.field('split.count')} split GGUF files; merge them first "
                            f"(llama-gguf-split --merge)")
        self.arch = str(self.field("general.architecture", ""))
        if self.arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: GGUF architecture {self.arch!r} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)} (llama with experts: Mixtral)")
        self.architecture = ARCHITECTURES[self.arch]
        if self.arch == "deepseek2" and (any(n.endswith(".exp_probs_b.bias") for n in self.tensors)
                                         or self.arch_field("expert_gating_func") == 2):
            self.architecture = "DeepseekV3ForCausalLM"
        self._check_types()

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def type_name(self, name: str) -> str:
        return self.tensors[name].kind

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in torch order (ggml lists dimensions innermost first)."""
        return self.tensors[name].shape

    def _check_types(self) -> None:
        """Refuse, before anything is allocated, tensors of types we can neither keep nor dequantize."""
        from gguf.quants import _type_traits

        bad: dict[str, list[str]] = {}
        for name, t in self.tensors.items():
            if t.kind in FLOAT_TYPES or t.kind in PACKED:
                continue
            if t.ggml_type not in _type_traits:
                bad.setdefault(t.kind, []).append(name)
        if bad:
            what = "; ".join(f"{k}: {', '.join(v[:6])}" + (f", ... ({len(v) - 6} more)" if len(v) > 6 else "")
                             for k, v in bad.items())
            raise GGUFError(f"{self.path}: GGUF tensor type(s) not supported ({what}); supported: F32, F16, BF16, "
                            f"Q8_0, Q4_0, Q4_1 kept packed, and the types the gguf package dequantizes "
                            f"(K-quants, IQ*, ...)")

    # --- config ---------------------------------------------------------------------------------

    def config(self) -> MoEModelConfig:
        """Our config, through the family's transformers config built from the metadata."""
        from models.hf_config import from_hf_config
        from models.registry import family_for

        a = self.arch_field
        num_layers, hidden = a("block_count"), a("embedding_length")
        heads, kv_heads = a("attention.head_count"), a("attention.head_count_kv")
        experts, used = a("expert_count", 0), a("expert_used_count", 0)
        for key, value in (("block_count", num_layers), ("embedding_length", hidden),
                           ("attention.head_count", heads)):
            if not isinstance(value, int) or value < 1:
                raise GGUFError(f"{self.path}: metadata {self.arch}.{key} = {value!r}: a positive integer needed")
        if isinstance(kv_heads, np.ndarray) or isinstance(heads, np.ndarray):
            raise GGUFError(f"{self.path}: per-layer head counts ({self.arch}.attention.head_count_kv) are not supported")
        if not experts:
            raise GGUFError(f"{self.path}: no {self.arch}.expert_count: a dense model (moe-serve serves "
                            f"mixture-of-experts models)")
        theta = _f32(a("rope.freq_base", 10000.0))
        embd = self.shape("token_embd.weight") if "token_embd.weight" in self.tensors else None
        tokens = self.field("tokenizer.ggml.tokens")
        vocab = embd[0] if embd else a("vocab_size") or (tokens.count if tokens is not None else None)
        dense = [i for i in range(num_layers) if f"blk.{i}.ffn_down_exps.weight" not in self.tensors]
        bias = "blk.0.attn_q.bias" in self.tensors
        ffn = a("feed_forward_length")
        expert_ffn = a("expert_feed_forward_length") or ffn
        fields: dict[str, Any] = dict(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            rms_norm_eps=_f32(a("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=a("context_length", 4096),
            rope_parameters=self._rope(theta),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            # llama.cpp ends generation at any end-of-generation token: end of text, of turn, of message
            eos_token_id=[i for k in ("eos", "eot", "eom") if (i := self.field(f"tokenizer.ggml.{k}_token_id"))
                          is not None] or None,
            pad_token_id=self.field("tokenizer.ggml.padding_token_id"),
        )
        if self.arch == "deepseek2":
            fields.update(self._deepseek2_fields(ffn, expert_ffn, experts, used))
        elif self.arch == "gpt-oss":
            head_dim = a("attention.key_length") or hidden // heads
            fields.update(head_dim=head_dim, intermediate_size=expert_ffn, num_local_experts=experts,
                          num_experts_per_tok=used, sliding_window=a("attention.sliding_window"),
                          attention_bias=bias,
                          # not in the file: llama.cpp's gpt-oss graph clamps at 7.0 (the released models')
                          swiglu_limit=_f32(a("swiglu_clamp_exp", 7.0)))
        else:
            head_dim = a("attention.key_length") or hidden // heads
            rope_dim = a("rope.dimension_count", head_dim)
            if rope_dim != head_dim:
                raise GGUFError(f"{self.path}: partial rotary ({self.arch}.rope.dimension_count {rope_dim} of a head "
                                f"of {head_dim}) is not supported for {self.arch}")
            fields["head_dim"] = head_dim
        if self.arch == "llama":
            if dense:
                raise GGUFError(f"{self.path}: llama layers without experts ({dense[:4]}): not a Mixtral checkpoint")
            fields.update(intermediate_size=expert_ffn, num_local_experts=experts, num_experts_per_tok=used,
                          sliding_window=None)
        elif self.arch in ("qwen2moe", "qwen3moe", "olmoe"):
            fields.update(num_experts=experts, num_experts_per_tok=used, moe_intermediate_size=expert_ffn,
                          mlp_only_layers=dense, decoder_sparse_step=1,
                          intermediate_size=ffn if self.arch != "olmoe" else expert_ffn)
            if self.arch == "qwen2moe":
                shexp = "blk.0.ffn_up_shexp.weight"
                shared = a("expert_shared_feed_forward_length") or (
                    self.shape(shexp)[0] if shexp in self.tensors else 0)
                fields.update(shared_expert_intermediate_size=shared, qkv_bias=bias,
                              norm_topk_prob=bool(a("expert_weights_norm", False)), use_sliding_window=False)
            elif self.arch == "qwen3moe":
                # llama.cpp renormalises Qwen3-MoE's top-k weights whatever the file says
                fields.update(attention_bias=bias, norm_topk_prob=bool(a("expert_weights_norm", True)),
                              use_sliding_window=False)
            else:  # olmoe
                fields.update(attention_bias=bias, norm_topk_prob=bool(a("expert_weights_norm", False)),
                              clip_qkv=a("attention.clamp_kqv"))
        family = family_for(self.architecture)
        try:
            hf = family.hf_config_class(self.architecture)(**fields)
        except Exception as e:  # noqa: BLE001 - the metadata does not make a valid config
            raise GGUFError(f"{self.path}: its metadata does not make a {self.architecture} config: {e}") from None
        hf.architectures = [self.architecture]
        cfg = from_hf_config(hf, self.architecture, {"torch_dtype": self.float_dtype()})
        cfg.extra["quant"] = None
        cfg.extra["gguf"] = self.path
        return cfg

    def _rope(self, theta: float) -> dict[str, Any]:
        """rope_parameters from `<arch>.rope.*`: default, or YaRN for deepseek2 and gpt-oss."""
        a = self.arch_field
        scaling = a("rope.scaling.type")
        if scaling in (None, "none"):
            return {"rope_type": "default", "rope_theta": theta}
        if scaling != "yarn" or self.arch not in ("deepseek2", "gpt-oss"):
            raise GGUFError(f"{self.path}: rope scaling {scaling!r} ({self.arch}.rope.scaling.type) is not supported "
                            f"for {self.arch} (YaRN is, for deepseek2 and gpt-oss)")
        params = dict(rope_type="yarn", rope_theta=theta, factor=_f32(a("rope.scaling.factor")),
                      original_max_position_embeddings=a("rope.scaling.original_context_length"),
                      beta_fast=_f32(a("rope.scaling.yarn_beta_fast", 32.0)),
                      beta_slow=_f32(a("rope.scaling.yarn_beta_slow", 1.0)))
        if (attn := a("rope.scaling.yarn_attn_factor")) is not None:
            params["attention_factor"] = _f32(attn)
        if self.arch == "deepseek2" and (log_mul := a("rope.scaling.yarn_log_multiplier")) is not None:
            # llama.cpp's converter writes 0.1 * mscale_all_dim; the released models have mscale equal to it
            params["mscale"] = params["mscale_all_dim"] = _f32(log_mul / 0.1)
        if self.arch == "gpt-oss":
            params["truncate"] = False  # gpt-oss's own YaRN (its config.json); llama.cpp rounds the ramp's ends
        return params

    def _deepseek2_fields(self, ffn: int, expert_ffn: int, experts: int, used: int) -> dict[str, Any]:
        """DeepSeek-V2/V3's MLA and routing fields from llama.cpp's `deepseek2` metadata (written for
        MLA as MQA: head_count_kv 1 and, in newer files, key/value lengths of the latent)."""
        a = self.arch_field
        heads, rope = a("attention.head_count"), a("rope.dimension_count")
        kv_rank = a("attention.kv_lora_rank")
        key = a("attention.key_length_mla") or a("attention.key_length")
        value = a("attention.value_length_mla") or a("attention.value_length")
        if not all(isinstance(v, int) and v > 0 for v in (rope, kv_rank, key, value)) or key <= rope:
            raise GGUFError(f"{self.path}: deepseek2 metadata without a valid MLA shape (attention.kv_lora_rank "
                            f"{kv_rank}, key_length(_mla) {key}, value_length(_mla) {value}, rope.dimension_count {rope})")
        gating = a("expert_gating_func")
        v3 = self.architecture == "DeepseekV3ForCausalLM"
        if gating is not None and gating != (2 if v3 else 1):
            raise GGUFError(f"{self.path}: deepseek2 with expert_gating_func {gating} "
                            f"{'and' if v3 else 'without'} exp_probs_b (router correction biases) is not supported")
        groups, used_groups = a("expert_group_count", 1) or 1, a("expert_group_used_count", 1) or 1
        out = dict(q_lora_rank=a("attention.q_lora_rank") or None, kv_lora_rank=kv_rank, qk_rope_head_dim=rope,
                   qk_nope_head_dim=key - rope, v_head_dim=value, num_key_value_heads=heads,
                   intermediate_size=ffn, moe_intermediate_size=expert_ffn, n_routed_experts=experts,
                   num_experts_per_tok=used, n_shared_experts=a("expert_shared_count", 0),
                   first_k_dense_replace=a("leading_dense_block_count", 0),
                   routed_scaling_factor=_f32(a("expert_weights_scale", 1.0)) or 1.0,
                   norm_topk_prob=bool(a("expert_weights_norm", False)), n_group=groups, topk_group=used_groups,
                   attention_bias=False)
        if v3:
            out.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True)
        else:
            out.update(scoring_func="softmax", topk_method="group_limited_greedy" if groups > 1 else "greedy")
        return out

    def float_dtype(self) -> str:
        """The dtype of the file's float matrices (the checkpoint dtype `--dtype auto` starts from)."""
        kinds = Counter(t.kind for t in self.tensors.values() if len(t.shape) >= 2)
        floats = [k for k, _ in kinds.most_common() if k in FLOAT_TYPES]
        return {"F16": "float16", "BF16": "bfloat16"}.get(floats[0], "float32") if floats else "float32"

    # --- weights ----------------------------------------------------------------------------------

    def entries(self, weight_map: WeightMap, cfg: MoEModelConfig) -> dict[str, list[tuple[str, tuple]]]:
        """llama.cpp tensor name -> [(our parameter, index)] from the family's weight map: an
        experts stack fills the same rows of every expert at once."""
        out: dict[str, list[tuple[str, tuple]]] = {}
        for name, entry in weight_map.items():
            if self.arch == "gpt-oss" and ".mlp.experts." in name:
                continue  # stored per expert kind by llama.cpp: below
            if len(entry) > 2:
                raise GGUFError(f"{name}: a transformed checkpoint tensor, not supported in GGUF import")
            param, index = entry[0], tuple(entry[1])
            gname, stacked = _hf_name_to_gguf(name)
            if self.arch == "gpt-oss":  # its post_attention_layernorm is the pre-FFN norm; llama.cpp's name
                gname = gname.replace(".ffn_norm.", ".post_attention_norm.")
            if stacked:  # (expert, rows...) -> (all experts, rows...)
                index = (slice(None),) + index[1:] if len(index) > 1 else ()
            target = (param, index)
            if target not in out.setdefault(gname, []):
                out[gname].append(target)
        if self.arch == "gpt-oss":
            out.update(_gpt_oss_experts(cfg))
        return self._fused(out)

    def _fused(self, out: dict[str, list[tuple[str, tuple]]]) -> dict[str, list[tuple[str, tuple]]]:
        """llama.cpp's optional fused tensors (convert_hf_to_gguf.py --fuse-gate-up-exps, --fuse-qkv):
        `ffn_gate_up_exps` [E, 2I, H] (gate rows, then up) and `attn_qkv` (q, k, v rows) fill the
        rows their parts would, when those parts fill consecutive rows of one parameter (our fused
        w13 and qkv). Not for `llama` q/k/v (their rows are permuted per part)."""
        for name in self.tensors:
            m = re.fullmatch(r"blk\.(\d+)\.(ffn_gate_up_exps|attn_qkv)\.(weight|bias)", name)
            if not m or name in out or (m[2] == "attn_qkv" and self.arch == "llama"):
                continue
            kinds = ("gate_exps", "up_exps") if m[2] == "ffn_gate_up_exps" else ("q", "k", "v")
            prefix = "ffn" if m[2] == "ffn_gate_up_exps" else "attn"
            parts = [f"blk.{m[1]}.{prefix}_{k}.{m[3]}" for k in kinds]
            targets = [out.get(p) or [] for p in parts]
            if any(len(t) != 1 for t in targets) or len({t[0][0] for t in targets}) != 1:
                continue
            param, indexes = targets[0][0][0], [t[0][1] for t in targets]
            rows = [ix[-1] if ix else None for ix in indexes]
            if not all(isinstance(r, slice) and r.step is None for r in rows) or any(
                    ix[:-1] != indexes[0][:-1] for ix in indexes) or any(
                    a.stop != b.start for a, b in zip(rows, rows[1:])):
                continue
            for p in parts:
                del out[p]
            out[name] = [(param, indexes[0][:-1] + (slice(rows[0].start, rows[-1].stop),))]
        return out

    def _derived_from(self, gname: str) -> tuple[str, ...]:
        """The file's tensors `derived(gname)` builds `gname` from; () if it cannot."""
        if not gname.endswith(".attn_kv_b.weight"):
            return ()
        names = gname.replace("attn_kv_b", "attn_k_b"), gname.replace("attn_kv_b", "attn_v_b")
        return names if all(n in self.tensors for n in names) else ()

    def derived(self, gname: str) -> torch.Tensor:
        """A tensor the file holds in another form, as float32: DeepSeek's `attn_kv_b` [H * (nope + v),
        rank], which newer llama.cpp writes split as `attn_k_b` [H, rank, nope] (transposed, for MLA's
        weight absorption) and `attn_v_b` [H, v, rank]."""
        k_name, v_name = self._derived_from(gname)
        k_b, v_b = self._float(k_name, None), self._float(v_name, None)
        if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[:2] != (v_b.shape[0], v_b.shape[2]):
            raise GGUFError(f"{self.path}: {k_name} {tuple(k_b.shape)} and {v_name} {tuple(v_b.shape)} do not "
                            f"make one kv_b ([heads, rank, nope] and [heads, v, rank])")
        kv = torch.cat((k_b.transpose(1, 2), v_b), dim=1)  # [H, nope + v, rank]
        return kv.reshape(-1, kv.shape[-1])

    def plan_formats(self, cfg: MoEModelConfig, weight_map: WeightMap,
                     quantizable: dict[str, bool]) -> tuple[dict[str, bool], dict[str, str]]:
        """(which weight groups stay quantized, parameter -> its packed format). A group is kept
        quantized when its tensors are not all float (and our kernels run it: `quantizable`)."""
        entries = self.entries(weight_map, cfg)
        parts: dict[str, list[str]] = {}  # parameter -> the types of the tensors filling it
        for gname, targets in entries.items():
            if gname in self.tensors:
                for param, _ in targets:
                    parts.setdefault(param, []).append(self.type_name(gname))
        groups = {g: False for g in quantizable}
        for param, kinds in parts.items():
            g = param_group(param)
            if g is not None and quantizable.get(g) and any(k not in FLOAT_TYPES for k in kinds):
                groups[g] = True
        formats = {}
        for param, kinds in parts.items():
            g = param_group(param)
            if g is None or not groups.get(g):
                continue
            fmts = {PACKED.get(k, "int8") for k in kinds}  # float and other types: requantized to int8
            formats[param] = max(fmts, key=_WIDTH.__getitem__)
        for param in list(formats):  # the C experts kernel takes one format for a layer's w13 and w2
            if param.endswith(".moe.w13") and (w2 := param[:-3] + "w2") in formats:
                formats[param] = formats[w2] = max(formats[param], formats[w2], key=_WIDTH.__getitem__)
        return groups, formats

    def mxfp4_params(self, cfg: MoEModelConfig, weight_map: WeightMap, groups: dict[str, bool]) -> list[str]:
        """The parameters kept as `mxfp4` QTensors (models/quant: the format gpt-oss's own checkpoints
        keep their experts in): expert stacks whose weight tensors are all MXFP4 in the file and
        that our int8/int4 kernels do not hold (`groups`: gpt-oss's biased, clamped experts)."""
        kinds: dict[str, set[str]] = {}
        for gname, targets in self.entries(weight_map, cfg).items():
            if gname in self.tensors and gname.endswith(".weight"):
                for param, _ in targets:
                    kinds.setdefault(param, set()).add(self.type_name(gname))
        return sorted(p for p, k in kinds.items() if k == {"MXFP4"} and re.fullmatch(r"layers\.\d+\.moe\.w(13|2)", p)
                      and not groups.get("experts"))

    def load(self, model: MoEForCausalLM, weight_map: WeightMap, quantized: dict[str, QuantWeight],
             qparams: dict[str, Any] | None = None) -> None:
        """Every tensor into its parameter(s) (or, for those in `quantized`, its QuantWeight; in
        `qparams`, its QParam), checking the file against the weight map both ways."""
        from models.loader import CheckpointError

        cfg = model.config
        entries = self.entries(weight_map, cfg)
        params = dict(model.named_parameters(remove_duplicate=False))
        derived = {g: src for g in set(entries) - set(self.tensors) if (src := self._derived_from(g))}
        parts = {p for used in derived.values() for p in used}
        # rope_freqs (llama 3 rope scaling) is unexpected too
        unexpected = sorted(set(self.tensors) - set(entries) - parts)
        missing = sorted(set(entries) - set(self.tensors) - set(derived))
        mismatched, non_finite = [], []
        for gname, targets in entries.items():
            if gname in derived:
                w = self.derived(gname)
                kind, shape = "derived", tuple(w.shape)
            elif gname in self.tensors:
                kind, shape = self.tensors[gname].kind, self.shape(gname)
            else:
                continue
            heads = None
            if self.arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_heads if ".attn_q." in gname else cfg.num_kv_heads
            for param, index in targets:
                dest_shape = tuple(params[param][index].shape) if index else tuple(params[param].shape)
                if shape != dest_shape and not (len(shape) == 1 and int(np.prod(dest_shape)) == shape[0]):
                    mismatched.append(f"{gname}: file {shape} vs expected {dest_shape}")
                    continue
                qp = (qparams or {}).get(param)
                if qp is not None:
                    if kind == "MXFP4":  # the weight's rows: the index without its input columns
                        qp.write(index[:-1], self._mxfp4(gname))
                    else:  # an expert bias (the bias column)
                        qp.write(index, self._float(gname, None).to(qp.bias.dtype))
                    continue
                qw = quantized.get(param)
                if qw is not None and kind in PACKED and PACKED[kind] == qw.fmt:
                    q, d, m = self._blocks(gname)
                    if heads:
                        q, d, m = (None if x is None else _unpermute_rows(x, heads) for x in (q, d, m))
                    qw.write_quantized(index, q, d, m)
                    continue
                if qw is not None and qw.fmt == "int8" and kind == "MXFP4" and (exact := self._mxfp4_int8(gname)):
                    q, d = exact  # MXFP4 fits int8 groups of 32 exactly: no re-rounding
                    if heads:
                        q, d = _unpermute_rows(q, heads), _unpermute_rows(d, heads)
                    qw.write_quantized(index, q, d, None)
                    continue
                if gname not in derived:
                    w = self._float(gname, qw.fmt if qw is not None else None)
                if heads:
                    w = _unpermute_rows(w, heads)
                if not bool(torch.isfinite(w).all()):
                    non_finite.append(gname)
                    continue
                if qw is not None:
                    if kind in FLOAT_TYPES:
                        log.info("GGUF %s: %s %s quantized at load to %s (its fused weight is held packed)", gname,
                                 kind, list(shape), qw.fmt)
                    qw.write(index, w)
                else:
                    dest = params[param].data[index] if index else params[param].data
                    dest.copy_(w.reshape(dest.shape).to(dest.dtype))
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
        if non_finite:
            problems.append(f"tensors holding NaN or infinity ({len(non_finite)}): {_names(non_finite)}")
        if problems:
            raise CheckpointError(f"GGUF {self.path!r} does not fit {self.architecture}: " + "; ".join(problems))

    def _blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A Q8_0 / Q4_0 / Q4_1 / Q4_K tensor's (values [..., rows, K or K/2] uint8, fp16 d
        [..., rows, K/32], fp16 m or None): the blocks' bytes, de-interleaved."""
        t = self.tensors[name]
        kind = t.kind
        if kind == "Q4_K":
            return self._q4_k(name)
        size, halves = _BLOCK[kind]
        *lead, K = self.shape(name)
        with warnings.catch_warnings():  # a read-only view of the file's map: only read, copied out
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.asarray(t.data)).reshape(*lead, K // GROUP, size)
        d = raw[..., :2].contiguous().view(torch.float16).reshape(*lead, K // GROUP)
        m = raw[..., 2:4].contiguous().view(torch.float16).reshape(*lead, K // GROUP) if halves == 2 else None
        q = raw[..., 2 * halves:].reshape(*lead, -1)
        return q, d, m

    def _q4_k(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A Q4_K tensor as `int4_zp` groups of 32: (nibbles [..., rows, K/2], d, m fp16 [..., K/32]).

        A Q4_K super-block of 256 (144 bytes: fp16 d and dmin, 12 bytes of eight 6-bit scales sc
        and minimums mn, 128 bytes of 4-bit values) holds 8 sub-blocks of 32 with
        w = (d * sc) * q - (dmin * mn): each sub-block is an int4_zp group with d' = d * sc and
        m' = -dmin * mn. The values are the file's (only their nibble order changes: ggml puts
        sub-blocks 2c and 2c + 1 in the low and high nibbles of the same 32 bytes, ours elements
        i and i + 16 of a group in one byte). d' and m' are computed exactly in float32 (an 11-bit
        fp16 times a 6-bit integer) and rounded to float16 once: |d' - d*sc| <= 2^-11 |d*sc|
        (2^-25 below fp16's normal range), m' alike, so each weight is within
        15 |d' - d*sc| + |m' - dmin*mn| of the file's dequantization (not bit-exact)."""
        from gguf.quants import Q4_K

        t = self.tensors[name]
        *lead, K = self.shape(name)
        nb = K // 256
        raw = np.asarray(t.data).reshape(-1, 144)
        packed = torch.empty(len(raw), 8, 16, dtype=torch.uint8)
        scale, mins = torch.empty(len(raw), 8, dtype=torch.float16), torch.empty(len(raw), 8, dtype=torch.float16)
        for s in range(0, len(raw), _CHUNK):  # a bounded working set for large expert stacks
            r = raw[s:s + _CHUNK]
            d = r[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
            dmin = r[:, 2:4].copy().view(np.float16).astype(np.float32)
            sc, mn = Q4_K.get_scale_min(r[:, 4:16])  # [B, 8] each, 0..63
            scale[s:s + _CHUNK] = torch.from_numpy(d * sc.astype(np.float32)).half()
            mins[s:s + _CHUNK] = torch.from_numpy(-(dmin * mn.astype(np.float32))).half()
            qs = torch.from_numpy(r[:, 16:].copy()).reshape(-1, 4, 32)  # [B, chunk, 32]
            vals = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32)  # [B, sub-block, 32]
            packed[s:s + _CHUNK] = vals[..., :16] | (vals[..., 16:] << 4)
        if not bool(torch.isfinite(scale).all() and torch.isfinite(mins).all()):
            raise GGUFError(f"{self.path}: {name}: a Q4_K sub-block scale outside float16's range")
        return (packed.reshape(*lead, nb * 128), scale.reshape(*lead, nb * 8), mins.reshape(*lead, nb * 8))

    def _mxfp4(self, name: str) -> Any:
        """An MXFP4 tensor as models/quant's `mxfp4` QTensor, bit for bit: ggml's 17-byte block (E8M0
        exponent e, then 16 bytes holding element j low and j + 16 high, codes read as twice the
        E2M1 value times 2^(e - 128)) -> codes with element 2j low and 2j + 1 high, the same E8M0
        byte (E2M1 value times 2^(e - 127): the same weights)."""
        from models.quant.formats import MX_GROUP, QTensor, WeightFormat

        t = self.tensors[name]
        *lead, K = self.shape(name)
        raw = torch.from_numpy(np.array(t.data)).reshape(*lead, K // MX_GROUP, 17)
        scale = raw[..., 0].contiguous()
        qs = raw[..., 1:]
        codes = torch.stack((qs & 0x0F, qs >> 4), dim=-2).reshape(*lead, K // MX_GROUP, 32)  # element order
        data = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(*lead, K // 2)
        return QTensor(WeightFormat.MXFP4, (*lead, K), data.contiguous(), scale, group=MX_GROUP)

    def _mxfp4_int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An MXFP4 tensor as `int8` groups of 32, exactly: ggml's codes are twice the E2M1 values
        (integers -12..12) times 2^(e - 128), so q = those integers and d = 2^(e - 128) in float16
        (exact for e - 128 in -24..15). None when some exponent is outside that range."""
        from gguf.quants import MXFP4

        t = self.tensors[name]
        *lead, K = self.shape(name)
        raw = torch.from_numpy(np.array(t.data)).reshape(*lead, K // GROUP, 17)
        e = raw[..., 0].to(torch.int32) - 128
        if bool((e < -24).any() or (e > 15).any()):
            return None
        lut = torch.tensor(MXFP4.kvalues, dtype=torch.int8)
        blocks = raw.reshape(-1, 17)
        q = torch.empty(len(blocks), 32, dtype=torch.int8)
        for s in range(0, len(blocks), _CHUNK * 8):  # a bounded working set (the codes index as int64)
            qs = blocks[s:s + _CHUNK * 8, 1:]
            q[s:s + _CHUNK * 8] = lut[torch.cat((qs & 0x0F, qs >> 4), dim=-1).long()]  # element j low, j + 16 high
        return q.reshape(*lead, K).view(torch.uint8), torch.ldexp(torch.ones(()), e.float()).half()

    def _float(self, name: str, into: str | None) -> torch.Tensor:
        """A tensor as float32 (float types as stored; block types dequantized by the gguf package,
        logged: `into` the packed format it goes to, None for a float parameter)."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        kind = t.kind
        shape = self.shape(name)
        if kind == "BF16":
            return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape).float()
        if kind in ("F32", "F16"):
            return torch.from_numpy(np.array(t.data).view(np.float32 if kind == "F32" else np.float16)).reshape(
                shape).float()
        log.info("GGUF %s: %s %s dequantized at load to %s", name, kind, list(shape),
                 f"float, requantized to {into}" if into else "float")
        rows = t.data.reshape(*shape[:-1], -1)  # [..., bytes of a row]
        return torch.from_numpy(np.ascontiguousarray(dequantize(rows, t.ggml_type), dtype=np.float32)).reshape(shape)

    def describe_formats(self, formats: dict[str, str]) -> str:
        """One line: the packed formats held, by group (the kernel plan's note)."""
        by_group: dict[str, Counter] = {}
        for param, fmt in formats.items():
            by_group.setdefault(param_group(param) or "?", Counter())[fmt] += 1
        return "GGUF weights kept packed: " + "; ".join(
            f"{g} {', '.join(sorted(c))}" for g, c in by_group.items()) if by_group else "GGUF weights: all float"

    def close(self) -> None:
        """Drop the file mapping (the tensors were copied out)."""
        self.tensors = {}
        self.file = None


assert set(PACKED.values()) <= set(FORMATS)
