"""Checkpoint loading: safetensors (single file or sharded index) -> our parameters.

Each family gives an explicit name-mapping table (`models/<family>.py`, built with
`models/weight_map.py`): every checkpoint tensor name maps to one of our parameters, the slice
of it that it fills (our q/k/v and gate/up projections are fused, our experts stacked) and
optionally a transform (transpose, de-interleave). Loading checks the table both ways: a missing tensor, an unexpected tensor or
a shape mismatch fails, naming the tensors.

Tensors are streamed one at a time; quantized weights (FP8 with their scales, MXFP4 blocks
with theirs, see `models/quant`) are dequantized as they stream, so peak host memory beyond
the model itself is one tensor. Layers past `num_hidden_layers` (multi-token-prediction
modules of DeepSeek-V3 and GLM-4.5) and `mtp` modules are skipped with a log line, unless the
weight map names them (`load_model(..., mtp=True)` adds the MTP layers' entries: models/mtp.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from models.config import UnsupportedModelError
from models.kernels.quant import QuantWeight, row_index
from models.quant import QuantSpec
from models.quant.fp8 import dequant_fp8
from models.quant.mxfp4 import dequant_mxfp4
from models.weight_map import WeightMap

log = logging.getLogger(__name__)


IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# what an unquantized checkpoint's weights are stored in (int8, bool, float64: refused, not cast)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# tensors used only with activation / KV-cache quantization: we compute in the model dtype
UNUSED_SCALES = (".input_scale", ".k_scale", ".v_scale", ".output_scale")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP = re.compile(r"(^|\.)mtp")


class CheckpointError(ValueError):
    pass


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        return [_inside(path, name, index) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {path!r}")
    return [os.path.join(path, f) for f in found]


def _inside(path: str, name: object, index: str) -> str:
    """A shard the index names, refused unless its name stays inside the model directory: an
    index saying "../x.safetensors" or "/etc/x" must not read files from elsewhere. Symlinks the
    directory holds are followed (the Hugging Face cache links its snapshots to shared blobs)."""
    root = os.path.abspath(path)
    shard = os.path.normpath(os.path.join(root, name)) if isinstance(name, str) and name else ""
    if not shard.startswith(root + os.sep):
        raise CheckpointError(f"{index}: shard {str(name)[:200]!r} is outside the model directory {path!r}")
    return shard


def _companion(name: str, present: dict[str, int]) -> str | None:
    """The scale tensor that dequantizes `name`, if the checkpoint has one."""
    for suffix in ("_scale_inv", "_scale"):
        if name + suffix in present:
            return name + suffix
    return None


def iter_tensors(path: str, progress: bool = True, quant: QuantSpec | None = None,
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order, one at a time. Quantized weights come out dequantized
    (to `dtype`) under the name and layout an unquantized checkpoint would use; their scale
    tensors are consumed, not yielded."""
    if quant is not None and quant.int_config is not None:  # readers exist (models/quant/int_readers.py);
        # keeping their QTensors is the loader side of issue 27: replace this refusal when it reads them
        raise UnsupportedModelError(f"{quant.method} ({quant.int_config.reader}) checkpoints are not loaded yet: "
                                    f"INT4/INT8 weights need the quantized loader")
    files = checkpoint_files(path)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        where = {name: i for i, h in enumerate(handles) for name in h.keys()}  # name -> file index
        companions = {c for n in where if (c := _companion(n, where))} if quant is not None else set()
        if quant is not None and quant.method == "mxfp4":
            companions |= {n[: -len("_blocks")] + "_scales" for n in where if n.endswith("_blocks")}
        unused = 0
        for handle in tqdm(handles, desc="loading shards", unit="shard", disable=not progress or len(files) < 2):
            for name in handle.keys():
                if name in companions:
                    continue
                if quant is not None and name.endswith(UNUSED_SCALES):
                    unused += 1
                    continue
                if quant is not None and quant.method == "mxfp4" and name.endswith("_blocks"):
                    base = name[: -len("_blocks")]
                    scales = handles[where[base + "_scales"]].get_tensor(base + "_scales")
                    # dequantized [E, rows, cols] is the transpose of the unquantized tensor
                    yield base, dequant_mxfp4(handle.get_tensor(name), scales, dtype).transpose(-1, -2)
                    continue
                tensor = handle.get_tensor(name)
                if tensor.dtype in FP8_DTYPES:
                    scale_name = _companion(name, where)
                    if scale_name is None:
                        raise CheckpointError(f"fp8 tensor {name} has no {name}_scale_inv / {name}_scale")
                    scale = handles[where[scale_name]].get_tensor(scale_name)
                    tensor = dequant_fp8(tensor, scale, dtype, quant.weight_block_size)
                yield name, tensor
        if unused:
            log.info("ignored %d activation / KV-cache scale tensors (compute runs in the model dtype)", unused)


def _skipped(name: str, num_layers: int) -> bool:
    """Modules beyond the served model: extra (multi-token-prediction) layers and `mtp` modules."""
    m = _LAYER.match(name)
    return (m is not None and int(m.group(1)) >= num_layers) or _MTP.search(name) is not None


def load_weights(model: torch.nn.Module, path: str, weight_map: WeightMap, progress: bool = True,
                 quant: QuantSpec | None = None, quantized: dict[str, QuantWeight] | None = None) -> None:
    """Stream the checkpoint into the model's parameters; those named in `quantized`
    (--quantization: the parameter is a shape on the meta device) are quantized tensor by tensor
    into their `QuantWeight` instead, so that no float copy of them is ever whole."""
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = quantized or {}
    for name, entry in weight_map.items():
        if entry[0] in quantized and not row_index(tuple(entry[1]), len(quantized[entry[0]].shape)):
            raise CheckpointError(f"{name} fills columns of {entry[0]}, which --quantization keeps in row blocks")
    missing_params = sorted({e[0] for e in weight_map.values()} - set(params))
    if missing_params:  # a bug in a mapping table, not in the checkpoint
        raise CheckpointError(f"mapping table names unknown parameters: {missing_params[:8]}")
    num_layers = model.config.num_layers
    dtype = model.embed.weight.dtype
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    bad_dtypes: list[str] = []
    non_finite: list[str] = []
    skipped = 0
    aliases: dict[str, str] = getattr(weight_map, "aliases", {})  # another release's name -> the table's
    for name, tensor in iter_tensors(path, progress, quant, dtype):
        name = aliases.get(name, name)
        entry = weight_map.get(name)
        if entry is None:
            if _skipped(name, num_layers):
                skipped += 1
            elif not name.endswith(IGNORED_SUFFIXES):
                unexpected.append(name)
            continue
        param_name, index = entry[0], entry[1]
        if tensor.dtype not in WEIGHT_DTYPES:  # quantized formats arrive dequantized (iter_tensors)
            bad_dtypes.append(f"{name}: {str(tensor.dtype).removeprefix('torch.')}")
            continue
        if len(entry) > 2:
            tensor = entry[2](tensor)
        dest = params[param_name].data[index] if index else params[param_name].data
        if tuple(dest.shape) != tuple(tensor.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs expected {tuple(dest.shape)}")
            continue
        if not bool(torch.isfinite(tensor).all()):  # one pass over a tensor already in memory
            non_finite.append(name)
            continue
        if param_name in quantized:
            quantized[param_name].write(tuple(index), tensor)
            seen.add(name)
            continue
        dest.copy_(tensor.to(dest.dtype))
        seen.add(name)
    if skipped:
        log.info("ignored %d tensors of modules beyond the %d served layers (multi-token prediction)",
                 skipped, num_layers)
    refused = {m.split(":")[0] for m in mismatched + bad_dtypes} | set(non_finite)
    missing = sorted(set(weight_map) - seen - refused)
    problems = []
    if bad_dtypes:
        problems.append(f"tensors of a dtype these weights cannot have ({len(bad_dtypes)}; a quantized checkpoint "
                        f"needs its quantization_config): {_names(bad_dtypes)}")
    if non_finite:
        problems.append(f"tensors holding NaN or infinity ({len(non_finite)}): {_names(non_finite)}")
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_names(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_names(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not fit {type(model).__name__}: " + "; ".join(problems))


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
