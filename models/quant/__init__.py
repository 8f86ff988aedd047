"""Quantized checkpoints: their `quantization_config` parsed (`parse_quantization`) and the reader
that turns each method's tensors into `QTensor`s kept in their format (`READERS`, `reader_for`).

Supported `quantization_config` methods:
- `fp8` with `weight_block_size` (DeepSeek-V3/R1, Kimi K2, Qwen3 FP8 releases): float8_e4m3
  weights with a float32 `weight_scale_inv` per [block_n, block_k] tile (multiplied in);
- `compressed-tensors` in `float-quantized` format (FP8 weights with a `weight_scale` per tensor,
  per output channel or per block);
- `mxfp4` (gpt-oss experts): `*_blocks` (two FP4 E2M1 values per byte, 32 per block) and
  `*_scales` (one E8M0 power-of-two exponent per block).
- `gptq`, `awq` and compressed-tensors `pack-quantized` / `int-quantized` (INT4 / INT8): parsed by
  `models/quant/int_readers.py` into `QuantSpec.int_config`, whose readers convert the tensors to
  canonical `QTensor`s.
Anything else fails at load, naming the method. The loader (`models/loader.py`) keeps the weights
it can in their format (expert stacks, attention / MLA projections, shared experts, the LM head);
a weight whose fusion or transform cannot be done in the quantized layout is dequantized, one
tensor at a time as the loader streams the checkpoint, and named in the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.config import UnsupportedModelError
from models.quant.int_readers import IntQuantConfig, int_reader, is_int_quantization, parse_int_quantization
from models.quant.formats import CheckpointReader
from models.quant.fp8_readers import CompressedFloatReader, DeepSeekFP8Reader, MXFP4Reader

METHODS = ("fp8", "compressed-tensors", "mxfp4", "gptq", "awq")


@dataclass(frozen=True)
class QuantSpec:
    method: str  # one of METHODS
    weight_block_size: tuple[int, int] | None = None  # block scales: [block_n (output), block_k (input)]
    strategy: str | None = None  # compressed-tensors weights: tensor | channel | block
    ignore: tuple[str, ...] = ()  # modules left unquantized (informational: detected per tensor)
    int_config: IntQuantConfig | None = None  # gptq / awq / compressed-tensors int (models/quant/int_readers.py)
    format: str | None = None  # compressed-tensors: its `format` ("float-quantized", ...)

    @property
    def reader_key(self) -> str:
        """The key of this method's reader in `READERS`."""
        return f"{self.method}:{self.format}" if self.method == "compressed-tensors" else self.method


# the one registry of checkpoint readers: `QuantSpec.reader_key` -> a factory taking the spec
# (the method's `quant_method`; compressed-tensors by "compressed-tensors:<format>")
READERS: dict[str, Callable[[QuantSpec], CheckpointReader]] = {
    "fp8": lambda spec: DeepSeekFP8Reader(spec.weight_block_size),
    "compressed-tensors:float-quantized": lambda spec: CompressedFloatReader(spec.weight_block_size),
    "mxfp4": lambda spec: MXFP4Reader(),
}


def reader_for(spec: QuantSpec) -> CheckpointReader | None:
    """The reader of `spec`'s checkpoints, None where no reader keeps them quantized."""
    if spec.int_config is not None:  # gptq / awq / compressed-tensors int: models/quant/int_readers.py
        return int_reader(spec)
    factory = READERS.get(spec.reader_key)
    return None if factory is None else factory(spec)


def parse_quantization(qcfg: dict[str, Any] | None) -> QuantSpec | None:
    """`config.json`'s `quantization_config` -> QuantSpec; unsupported methods fail by name."""
    if not qcfg:
        return None
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in METHODS:
        raise UnsupportedModelError(
            f"quantization method {method or qcfg!r} is not supported; supported: {', '.join(METHODS)}")
    if is_int_quantization(qcfg):
        ic = parse_int_quantization(qcfg)
        return QuantSpec(method, ignore=ic.ignore, int_config=ic)
    if method == "fp8":
        block = qcfg.get("weight_block_size")
        if block is None:
            raise UnsupportedModelError("fp8 quantization without weight_block_size (per-tensor fp8) is not supported")
        if qcfg.get("fmt", "e4m3") != "e4m3":
            raise UnsupportedModelError(f"fp8 format {qcfg.get('fmt')!r} is not supported (only e4m3)")
        return QuantSpec("fp8", weight_block_size=(int(block[0]), int(block[1])))
    if method == "compressed-tensors":
        fmt = qcfg.get("format")
        if fmt != "float-quantized":
            raise UnsupportedModelError(f"compressed-tensors format {fmt!r} is not supported (only float-quantized FP8)")
        strategies: set[str] = set()
        blocks: set[tuple[int, int]] = set()
        for name, group in (qcfg.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            if weights.get("type") != "float" or weights.get("num_bits") != 8:
                raise UnsupportedModelError(f"compressed-tensors group {name!r}: weights "
                                            f"{weights.get('type')}{weights.get('num_bits')} are not supported (only float8)")
            strategy = weights.get("strategy", "tensor")
            if strategy not in ("tensor", "channel", "block"):
                raise UnsupportedModelError(f"compressed-tensors weight strategy {strategy!r} is not supported")
            strategies.add(strategy)
            if strategy == "block":
                block = [int(b) for b in weights.get("block_structure") or (128, 128)]
                if len(block) != 2:
                    raise UnsupportedModelError(f"compressed-tensors group {name!r}: block_structure {block} is not "
                                                f"[rows, columns]")
                blocks.add((block[0], block[1]))
        if len(blocks) > 1:
            raise UnsupportedModelError(f"compressed-tensors groups with different block structures {sorted(blocks)}")
        return QuantSpec("compressed-tensors", weight_block_size=blocks.pop() if blocks else None,
                         strategy=",".join(sorted(strategies)) or None, ignore=tuple(qcfg.get("ignore") or ()),
                         format=fmt)
    return QuantSpec("mxfp4", ignore=tuple(qcfg.get("modules_to_not_convert") or ()))
