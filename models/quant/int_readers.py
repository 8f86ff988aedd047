"""INT4 / INT8 pre-quantized checkpoints -> canonical `QTensor`s (issue 27).

Readers (`CheckpointReader`, models/quant/formats.py) for the three integer layouts MoE releases
ship, each converted once at load to `int4_group` (w = (q - zero) * scale, q unsigned 0..15,
zero None meaning 8) or `int8_channel` (w = q * scale, q signed):

- compressed-tensors `pack-quantized` (int4 group / channel / tensor strategy, symmetric or with
  zero points; int8 channel): `weight_packed` int32 [N, ceil(K*bits/32)] holding q + 2^(bits-1)
  densely, element i at bit i*bits of its row (little-endian words), `weight_scale`
  [N, K/g | 1], `weight_zero_point` (asymmetric) int32 packed the same way along N
  [ceil(N*bits/32), K/g], `weight_shape` [N, K]. Also `int-quantized` / `naive-quantized`
  (`weight` int8 holding q itself, -2^(bits-1)..2^(bits-1)-1).
- GPTQ (`quant_method: gptq`): `qweight` int32 [K/8, N] (element k = 8r + j at bits 4j of row r),
  `qzeros` int32 [K/g, N/8] packed along N the same way, `scales` [K/g, N], `g_idx` [K].
  w[k, n] = (q - z) * s with z the stored zero plus one, unless `checkpoint_format` is
  `gptq_v2` (vLLM's rule: auto-gptq's v1 stores zero - 1; GPTQModel's v2 stores the zero).
  8-bit: 4 elements per int32, accepted per channel (group_size -1) and symmetric only.
- AWQ GEMM (`quant_method: awq`, `version: gemm`): `qweight` int32 [K, N/8] and `qzeros` int32
  [K/g, N/8] packed along N in AWQ's interleaved order (nibble i holds column 8c + [0, 2, 4, 6,
  1, 3, 5, 7][i]), `scales` [K/g, N]; w = (q - z) * s.

desc_act / actorder (a `g_idx` that is not k // g) is refused at load, naming desc_act: the
canonical int4_group keeps each group contiguous along K, and a permuted K would need the
kernels to permute activations. Other variants (2/3-bit, grouped 8-bit, asymmetric 8-bit, AWQ
GEMV / Marlin layouts, static activation quantization) are refused naming what.

`parse_int_quantization` turns `config.json`'s `quantization_config` into an `IntQuantConfig`
(models/quant/__init__.py keeps it on `QuantSpec.int_config`); `INT_READERS` maps a reader key
(`IntQuantConfig.reader`: gptq, awq, pack-quantized, int-quantized) to the reader class, and
`int_reader(spec)` builds the reader for a parsed config.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from models.config import UnsupportedModelError
from models.quant.formats import CheckpointReader, FormatError, QTensor, WeightFormat, pack_nibbles

INT_METHODS = ("gptq", "awq")
CT_INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed word holds column 8c + AWQ_ORDER[i]
AWQ_UNORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a word is nibble AWQ_UNORDER[j]


@dataclass(frozen=True)
class IntQuantConfig:
    method: str  # gptq | awq | compressed-tensors
    reader: str  # the INT_READERS key: gptq | awq | pack-quantized | int-quantized
    bits: tuple[int, ...]  # the weight bit widths the config declares (4, 8)
    group_size: int | None = None  # gptq / awq: None = per output channel (group_size -1)
    sym: bool = True  # gptq: symmetric (zero point 8 / 128)
    zero_plus_one: bool = False  # gptq v1: the stored zero is the zero point minus one
    ignore: tuple[str, ...] = ()  # modules left unquantized (informational: detected per tensor)


def is_int_quantization(qcfg: dict[str, Any] | None) -> bool:
    """Whether `quantization_config` names an integer method these readers handle (or refuse)."""
    if not qcfg:
        return False
    method = str(qcfg.get("quant_method", "")).lower()
    return method in INT_METHODS or (method == "compressed-tensors" and qcfg.get("format") in CT_INT_FORMATS)


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"quantization_config {what} {value!r} is not an integer") from None


def parse_int_quantization(qcfg: dict[str, Any]) -> IntQuantConfig:
    """`quantization_config` of a GPTQ, AWQ or compressed-tensors integer checkpoint; variants the
    readers do not convert fail here, naming what."""
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "gptq":
        return _parse_gptq(qcfg)
    if method == "awq":
        return _parse_awq(qcfg)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qcfg)
    raise UnsupportedModelError(f"quantization method {method!r} is not an integer method ({', '.join(INT_METHODS)}, "
                                f"compressed-tensors {'/'.join(CT_INT_FORMATS)})")


def _group_size(value: Any, method: str) -> int | None:
    g = _int(value if value is not None else -1, f"{method} group_size")
    if g == -1:
        return None
    if g <= 0:
        raise UnsupportedModelError(f"{method} group_size {g} is not supported (a positive size or -1)")
    return g


def _parse_gptq(qcfg: dict[str, Any]) -> IntQuantConfig:
    bits = _int(qcfg.get("bits", 4), "gptq bits")
    if bits not in (4, 8):
        raise UnsupportedModelError(f"gptq bits {bits} is not supported (4, or 8 per channel)")
    group = _group_size(qcfg.get("group_size", 128), "gptq")
    sym = bool(qcfg.get("sym", True))
    if bits == 8 and (group is not None or not sym):
        raise UnsupportedModelError(f"gptq 8-bit with group_size {group} sym={sym} is not supported "
                                    f"(8-bit only symmetric per channel, group_size -1: int8_channel)")
    fmt = qcfg.get("checkpoint_format") or (qcfg.get("format") if str(qcfg.get("format", "")).startswith("gptq") else None)
    fmt = str(fmt or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(f"gptq checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    if qcfg.get("is_marlin_format"):
        raise UnsupportedModelError("gptq is_marlin_format checkpoints are not supported (Marlin-repacked weights)")
    if qcfg.get("dynamic"):
        raise UnsupportedModelError("gptq `dynamic` per-module overrides are not supported")
    # desc_act is checked per weight (a g_idx that is not k // g is refused there): checkpoints
    # with desc_act true but a trivial g_idx load
    return IntQuantConfig("gptq", "gptq", (bits,), group, sym, zero_plus_one=(fmt == "gptq"))


def _parse_awq(qcfg: dict[str, Any]) -> IntQuantConfig:
    bits = _int(qcfg.get("bits", qcfg.get("w_bit", 4)), "awq bits")
    if bits != 4:
        raise UnsupportedModelError(f"awq bits {bits} is not supported (4)")
    version = str(qcfg.get("version") or qcfg.get("format") or "gemm").lower()  # transformers 5 writes both
    if version != "gemm":
        raise UnsupportedModelError(f"awq version {version!r} is not supported (gemm)")
    if not qcfg.get("zero_point", True):
        raise UnsupportedModelError("awq zero_point false is not supported (the GEMM layout stores zero points)")
    group = _group_size(qcfg.get("group_size", qcfg.get("q_group_size", 128)), "awq")
    return IntQuantConfig("awq", "awq", (4,), group, sym=False,
                          ignore=tuple(qcfg.get("modules_to_not_convert") or ()))


def _parse_compressed_tensors(qcfg: dict[str, Any]) -> IntQuantConfig:
    fmt = qcfg.get("format")
    if fmt not in CT_INT_FORMATS:
        raise UnsupportedModelError(f"compressed-tensors format {fmt!r} is not an integer format "
                                    f"({', '.join(CT_INT_FORMATS)})")
    bits: set[int] = set()
    for name, group in (qcfg.get("config_groups") or {}).items():
        group = group or {}
        if group.get("format") not in (None, fmt):
            raise UnsupportedModelError(f"compressed-tensors group {name!r}: format {group.get('format')!r} in a "
                                        f"{fmt} checkpoint (mixed formats) is not supported")
        weights = group.get("weights") or {}
        nb = weights.get("num_bits")
        if weights.get("type") != "int" or nb not in (4, 8):
            raise UnsupportedModelError(f"compressed-tensors group {name!r}: weights {weights.get('type')}{nb} are not "
                                        f"supported in {fmt} (int4, int8)")
        strategy = weights.get("strategy") or "tensor"
        if strategy not in ("group", "channel", "tensor"):
            raise UnsupportedModelError(f"compressed-tensors group {name!r}: int{nb} weight strategy {strategy!r} is "
                                        f"not supported (group, channel, tensor)")
        if nb == 8 and (strategy == "group" or not weights.get("symmetric", True)):
            raise UnsupportedModelError(f"compressed-tensors group {name!r}: int8 weights with strategy {strategy!r} "
                                        f"symmetric={weights.get('symmetric', True)} are not supported (int8 only "
                                        f"symmetric per channel or tensor)")
        # actorder "group" saves a weight_g_idx: refused per weight unless it is k // g
        acts = group.get("input_activations")
        if acts and not acts.get("dynamic", False):
            raise UnsupportedModelError(f"compressed-tensors group {name!r}: static input activation quantization "
                                        f"is not supported (weights are computed with unquantized activations)")
        bits.add(int(nb))
    if not bits:
        raise UnsupportedModelError(f"compressed-tensors {fmt} without config_groups: no weight scheme to read")
    return IntQuantConfig("compressed-tensors", "int-quantized" if fmt == "naive-quantized" else fmt,
                          tuple(sorted(bits)), ignore=tuple(qcfg.get("ignore") or ()))


# ------------------------------------------------------------------------------------------------
# bit unpacking


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes (uint8), 32/bits per word along `dim`, element j of a word at
    bits [j*bits, (j+1)*bits) (the GPTQ, AWQ-before-reorder and compressed-tensors order). Works
    in int32: one temporary of 4 bytes per weight."""
    if packed.dtype != torch.int32:
        raise FormatError(f"packed weights must be int32, not {packed.dtype}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    p = packed.movedim(dim, -1)
    codes = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return codes.flatten(-2).movedim(-1, dim)


def _check_groups(name: str, K: int, G: int, group_size: int | None) -> None:
    """G scale groups over K inputs as the config's group_size says (None: one per channel; a group
    wider than K is one group)."""
    want = 1 if group_size is None else -(-K // group_size)
    if G != want:
        raise FormatError(f"{name}: {G} scale groups over {K} inputs, not group_size "
                          f"{-1 if group_size is None else group_size}")


def _check_g_idx(name: str, g_idx: torch.Tensor | None, K: int, group: int, what: str) -> None:
    """A g_idx must be the trivial k // group (no activation reordering)."""
    if g_idx is None:
        return
    want = torch.arange(K, device=g_idx.device) // group
    if g_idx.numel() != K or not bool((g_idx.reshape(-1, K).long() == want).all()):
        raise UnsupportedModelError(
            f"{name}: {what} with a reordered g_idx (desc_act / act-order) is not supported: the int4_group "
            f"format keeps groups contiguous along the input dim")


def _int4(name: str, codes_nk: torch.Tensor, scale_ng: torch.Tensor, zero_ng: torch.Tensor | None) -> QTensor:
    """codes [..., N, K] 0..15, scale [..., N, G], zero [..., N, G] (None: 8) -> int4_group."""
    N, K = codes_nk.shape[-2:]
    G = scale_ng.shape[-1]
    if K % 2 or G == 0 or K % G:
        raise FormatError(f"{name}: {K} inputs in {G} groups do not fit int4_group (an even K, equal groups)")
    if tuple(scale_ng.shape[-2:]) != (N, G) or (zero_ng is not None and zero_ng.shape != scale_ng.shape):
        raise FormatError(f"{name}: scales {tuple(scale_ng.shape)} / zeros "
                          f"{None if zero_ng is None else tuple(zero_ng.shape)} do not fit a [{N}, {K}] weight")
    if zero_ng is not None and (int(zero_ng.min()) < 0 or int(zero_ng.max()) > 255):
        raise FormatError(f"{name}: zero points outside 0..255")
    scale = scale_ng if scale_ng.dtype in (torch.float16, torch.bfloat16, torch.float32) else scale_ng.float()
    return QTensor(WeightFormat.INT4_GROUP, tuple(codes_nk.shape), pack_nibbles(codes_nk).contiguous(),
                   scale.contiguous(), None if zero_ng is None else zero_ng.to(torch.uint8).contiguous(),
                   group=K // G)


def _int8(name: str, q_nk: torch.Tensor, scale_n1: torch.Tensor) -> QTensor:
    """q [..., N, K] signed -128..127, scale [..., N, 1] -> int8_channel."""
    N = q_nk.shape[-2]
    if scale_n1.shape[-2:] != (N, 1):
        raise FormatError(f"{name}: int8 scales {tuple(scale_n1.shape)} are not one per output channel [{N}, 1]")
    return QTensor(WeightFormat.INT8_CHANNEL, tuple(q_nk.shape), q_nk.to(torch.int8).contiguous(),
                   scale_n1.to(torch.float32).contiguous())


def _get(tensors: dict[str, torch.Tensor], name: str, suffix: str, required: bool = True) -> torch.Tensor | None:
    key = name + suffix
    if key not in tensors:
        if required:
            raise FormatError(f"{name}: missing {key}")
        return None
    return tensors[key]


def _prefix(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


SCALE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _described(lead: tuple[int, ...], N: int, K: int, G: int, bits: int, zero: bool, scale_dtype: str | None
               ) -> tuple[WeightFormat, tuple[int, ...], None, dict[str, Any]]:
    """(format, logical shape, block, extras) of an int weight from its header alone (the loader's
    `plan_quantized`; `assemble` returns the same format, group, zero points and scale dtype)."""
    if bits == 8:
        return WeightFormat.INT8_CHANNEL, lead + (N, K), None, {}
    if G == 0 or K % G or K % 2:
        raise FormatError(f"{K} inputs in {G} groups do not fit int4_group")
    return WeightFormat.INT4_GROUP, lead + (N, K), None, {
        "group": K // G, "zero": zero, "scale_dtype": SCALE_DTYPES.get(scale_dtype or "", torch.float32)}


class _Reader:
    suffixes: tuple[str, ...] = ()  # the first names the weight (…<prefix><suffix>); the others join it
    optional: tuple[str, ...] = ()

    def __init__(self, spec: Any) -> None:
        cfg = getattr(spec, "int_config", None) or spec  # a QuantSpec carrying one, or the config itself
        if not isinstance(cfg, IntQuantConfig):
            raise TypeError(f"{type(self).__name__} needs an IntQuantConfig (or a QuantSpec with int_config)")
        self.cfg = cfg

    def group(self, names: Collection[str]) -> dict[str, tuple[str, ...]]:
        present = set(names)
        lead = self.suffixes[0]
        out: dict[str, tuple[str, ...]] = {}
        for n in names:  # in the checkpoint's order
            if not n.endswith(lead):
                continue
            prefix = n[: -len(lead)]
            members = [prefix + s for s in self.suffixes if prefix + s in present or s == lead]
            missing = [prefix + s for s in self.suffixes if prefix + s not in present]
            if missing and self._required(missing):
                raise FormatError(f"{prefix}.weight: quantized tensors {', '.join(missing)} are missing")
            members += [prefix + s for s in self.optional if prefix + s in present]
            out[prefix + ".weight"] = tuple(members)
        return out

    def _required(self, missing: list[str]) -> bool:
        return True

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        raise NotImplementedError


class GPTQReader(_Reader):
    """GPTQ `qweight` / `qzeros` / `scales` (/ `g_idx`) -> int4_group or int8_channel."""

    suffixes = (".qweight", ".qzeros", ".scales")
    optional = (".g_idx",)

    def describe(self, name: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None) -> tuple:
        p = _prefix(name)
        qweight, scales = shapes[p + ".qweight"], shapes[p + ".scales"]
        bits = self.cfg.bits[0]
        K, N = qweight[-2] * (32 // bits), qweight[-1]
        return _described(tuple(qweight[:-2]), N, K, scales[-2], bits, not self.cfg.sym,
                          (dtypes or {}).get(p + ".scales"))

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        p = _prefix(name)
        qweight, qzeros, scales = (_get(tensors, p, s) for s in self.suffixes)
        assert qweight is not None and qzeros is not None and scales is not None
        g_idx = _get(tensors, p, ".g_idx", required=False)
        if qweight.dtype != torch.int32:
            raise FormatError(f"{name}: gptq qweight int32 expected, not {qweight.dtype}")
        bits = self.cfg.bits[0]
        pf = 32 // bits
        K, N = qweight.shape[-2] * pf, qweight.shape[-1]
        G = scales.shape[-2]
        if scales.shape[-1] != N or qzeros.shape[-2] != G or qzeros.shape[-1] * pf < N or G == 0 or K % G:
            raise FormatError(f"{name}: gptq qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                              f"scales {tuple(scales.shape)} do not fit together")
        _check_groups(name, K, G, self.cfg.group_size)
        _check_g_idx(name, g_idx, K, K // G, "gptq")
        codes = unpack_int32(qweight, bits, -2).transpose(-1, -2)  # [..., N, K]
        zero = unpack_int32(qzeros, bits, -1)[..., :N].to(torch.int16) + (1 if self.cfg.zero_plus_one else 0)
        zero = zero.transpose(-1, -2)
        scale = scales.transpose(-1, -2)
        half = 1 << (bits - 1)
        if bits == 8:
            if G != 1 or not bool((zero == half).all()):
                raise UnsupportedModelError(f"{name}: gptq 8-bit weights need one symmetric group per channel "
                                            f"(int8_channel)")
            return _int8(name, codes.to(torch.int16) - half, scale)
        if self.cfg.sym:
            if not bool((zero == half).all()):
                raise FormatError(f"{name}: gptq sym=true but zero points other than {half} "
                                  f"(checkpoint_format {'gptq' if self.cfg.zero_plus_one else 'gptq_v2'})")
            return _int4(name, codes, scale, None)
        return _int4(name, codes, scale, zero)


class AWQReader(_Reader):
    """AWQ GEMM `qweight` / `qzeros` / `scales` -> int4_group with zero points."""

    suffixes = (".qweight", ".qzeros", ".scales")

    def describe(self, name: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None) -> tuple:
        p = _prefix(name)
        qweight, scales = shapes[p + ".qweight"], shapes[p + ".scales"]
        return _described(tuple(qweight[:-2]), qweight[-1] * 8, qweight[-2], scales[-2], 4, True,
                          (dtypes or {}).get(p + ".scales"))

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        p = _prefix(name)
        qweight, qzeros, scales = (_get(tensors, p, s) for s in self.suffixes)
        assert qweight is not None and qzeros is not None and scales is not None
        K, N = qweight.shape[-2], qweight.shape[-1] * 8
        G = scales.shape[-2]
        if scales.shape[-1] != N or tuple(qzeros.shape[-2:]) != (G, N // 8) or G == 0 or K % G:
            raise FormatError(f"{name}: awq qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                              f"scales {tuple(scales.shape)} do not fit together")
        _check_groups(name, K, G, self.cfg.group_size)
        codes = awq_unpack(qweight).transpose(-1, -2)  # [..., N, K]
        zero = awq_unpack(qzeros).transpose(-1, -2)  # [..., N, G]
        return _int4(name, codes, scales.transpose(-1, -2), zero)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [..., R, C] -> codes [..., R, 8C] in column order (undoing AWQ_ORDER)."""
    nib = unpack_int32(packed, 4, -1)
    lead = nib.shape[:-1]
    words = nib.reshape(*lead, -1, 8)[..., list(AWQ_UNORDER)]
    return words.reshape(*lead, -1)


class CompressedTensorsIntReader(_Reader):
    """compressed-tensors `pack-quantized` (`weight_packed`, `weight_scale`, `weight_shape`,
    `weight_zero_point`, `weight_g_idx`) -> int4_group / int8_channel."""

    suffixes = (".weight_packed", ".weight_scale", ".weight_shape")
    optional = (".weight_zero_point", ".weight_g_idx")

    def _required(self, missing: list[str]) -> bool:
        return not all(m.endswith(".weight_shape") for m in missing)  # old releases omit it for group

    def describe(self, name: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None) -> tuple:
        """Needs one declared bit width (weight_shape's values are data, not in the header): else the
        format is known only when read (the loader dequantizes that weight)."""
        if len(self.cfg.bits) != 1:
            return None, None, None
        p = _prefix(name)
        packed, scale = shapes[p + ".weight_packed"], shapes[p + ".weight_scale"]
        bits = self.cfg.bits[0]
        N, K = packed[-2], packed[-1] * 32 // bits
        G = scale[-1] if len(scale) >= 2 and scale[-2] == N else 1
        return _described(tuple(packed[:-2]), N, K, G, bits, p + ".weight_zero_point" in shapes,
                          (dtypes or {}).get(p + ".weight_scale"))

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        p = _prefix(name)
        packed = _get(tensors, p, ".weight_packed")
        scale = _get(tensors, p, ".weight_scale")
        assert packed is not None and scale is not None
        shape = _get(tensors, p, ".weight_shape", required=False)
        zp = _get(tensors, p, ".weight_zero_point", required=False)
        g_idx = _get(tensors, p, ".weight_g_idx", required=False)
        N = packed.shape[-2]
        if shape is not None:
            dims = [int(v) for v in shape.reshape(-1).tolist()]
            if dims[-2] != N:
                raise FormatError(f"{name}: weight_shape {dims} vs weight_packed {tuple(packed.shape)}")
            K = dims[-1]
        else:
            K = None
        bits = self._bits(name, packed, K, scale)
        K = K if K is not None else packed.shape[-1] * 32 // bits
        codes = unpack_int32(packed, bits, -1)[..., :K]  # q + 2^(bits-1)
        scale = _scale_per_row(name, scale, N)
        zero = None
        if zp is not None and zp.dtype == torch.int32:  # group / channel: packed along N
            zero = unpack_int32(zp, bits, -2)[..., :N, :]  # zero point + 2^(bits-1), [..., N, G]
        elif zp is not None:  # tensor strategy: kept as is
            zero = zp.to(torch.int64) + (1 << (bits - 1))
        return _ct_qtensor(name, codes, bits, scale, zero, g_idx)

    def _bits(self, name: str, packed: torch.Tensor, K: int | None, scale: torch.Tensor) -> int:
        if packed.dtype != torch.int32:
            raise FormatError(f"{name}.weight_packed: int32 expected, not {packed.dtype}")
        if K is None:  # no weight_shape: the one declared width
            if len(self.cfg.bits) != 1:
                raise FormatError(f"{name}: no weight_shape and several bit widths {self.cfg.bits}")
            return self.cfg.bits[0]
        for bits in self.cfg.bits:
            if packed.shape[-1] == -(-K * bits // 32):
                return bits
        raise FormatError(f"{name}: weight_packed {tuple(packed.shape)} is no {'/'.join(map(str, self.cfg.bits))}-bit "
                          f"packing of {K} inputs")


class CompressedTensorsIntQuantizedReader(_Reader):
    """compressed-tensors `int-quantized` / `naive-quantized`: `weight` int8 (q itself), `weight_scale`
    (`weight_zero_point`, `weight_g_idx`) -> int8_channel / int4_group."""

    suffixes = (".weight", ".weight_scale")
    optional = (".weight_zero_point", ".weight_g_idx")

    def describe(self, name: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None) -> tuple:
        p = _prefix(name)
        w, scale = shapes[p + ".weight"], shapes[p + ".weight_scale"]
        N, K = w[-2], w[-1]
        G = scale[-1] if len(scale) >= 2 and scale[-2] == N else 1
        return _described(tuple(w[:-2]), N, K, G, 4 if self.cfg.bits == (4,) else 8,
                          p + ".weight_zero_point" in shapes, (dtypes or {}).get(p + ".weight_scale"))

    def group(self, names: Collection[str]) -> dict[str, tuple[str, ...]]:
        present = set(names)
        out = {}
        for n in names:
            if n.endswith(".weight_scale") and (w := n[: -len("_scale")]) in present:
                out[w] = (w, n) + tuple(w + s[len(".weight"):] for s in self.optional if w + s[len(".weight"):] in present)
        return out

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        p = _prefix(name)
        q = _get(tensors, p, ".weight")
        scale = _get(tensors, p, ".weight_scale")
        assert q is not None and scale is not None
        if q.dtype != torch.int8:
            raise FormatError(f"{name}: int-quantized weight of dtype {q.dtype} (int8 expected)")
        zp = _get(tensors, p, ".weight_zero_point", required=False)
        g_idx = _get(tensors, p, ".weight_g_idx", required=False)
        bits = 4 if self.cfg.bits == (4,) else 8
        if bits == 4 and (int(q.min()) < -8 or int(q.max()) > 7):
            raise FormatError(f"{name}: int4 values outside -8..7")
        N = q.shape[-2]
        half = 1 << (bits - 1)
        zero = None if zp is None else zp.to(torch.int64) + half
        return _ct_qtensor(name, q.to(torch.int64) + half, bits, _scale_per_row(name, scale, N), zero, g_idx)


def _scale_per_row(name: str, scale: torch.Tensor, N: int) -> torch.Tensor:
    """compressed-tensors scale: [..., N, G] as is; a per-tensor [1] / [] repeated per row [N, 1]."""
    if scale.dim() <= 1 and scale.numel() == 1:
        return scale.reshape(1, 1).expand(N, 1)
    if scale.dim() < 2 or scale.shape[-2] != N:
        raise FormatError(f"{name}: weight_scale {tuple(scale.shape)} does not fit {N} output rows")
    return scale


def _ct_qtensor(name: str, codes: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None,
                g_idx: torch.Tensor | None) -> QTensor:
    K = codes.shape[-1]
    G = scale.shape[-1]
    if G and K % G == 0:
        _check_g_idx(name, g_idx, K, K // G, "compressed-tensors actorder")
    half = 1 << (bits - 1)
    if zero is not None and zero.dim() <= 1 and zero.numel() == 1:  # per tensor
        zero = zero.reshape(1, 1).expand(codes.shape[-2], 1)
    if bits == 8:
        if G != 1 or (zero is not None and not bool((zero == half).all())):
            raise UnsupportedModelError(f"{name}: int8 weights need one symmetric scale per channel (int8_channel)")
        return _int8(name, codes.to(torch.int16) - half, scale)
    if zero is not None and zero.shape != scale.shape:
        raise FormatError(f"{name}: weight_zero_point {tuple(zero.shape)} vs weight_scale {tuple(scale.shape)}")
    return _int4(name, codes, scale, zero)


INT_READERS: dict[str, type[_Reader]] = {
    "gptq": GPTQReader,
    "awq": AWQReader,
    "pack-quantized": CompressedTensorsIntReader,
    "int-quantized": CompressedTensorsIntQuantizedReader,
}


def int_reader(spec: Any) -> CheckpointReader:
    """The reader of a parsed integer config (an IntQuantConfig, or a QuantSpec carrying one)."""
    cfg = getattr(spec, "int_config", None) or spec
    if not isinstance(cfg, IntQuantConfig):
        raise TypeError("int_reader needs an IntQuantConfig (or a QuantSpec with int_config)")
    reader: CheckpointReader = INT_READERS[cfg.reader](cfg)
    return reader

