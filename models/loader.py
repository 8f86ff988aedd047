"""Checkpoint loading: safetensors (single file or sharded index) -> our parameters.

Each family gives an explicit name-mapping table (`models/<family>.py`, built with
`models/weight_map.py`): every checkpoint tensor name maps to one of our parameters, the slice
of it that it fills (our q/k/v and gate/up projections are fused, our experts stacked) and
optionally a transform (transpose, de-interleave). Loading checks the table both ways: a missing tensor, an unexpected tensor or
a shape mismatch fails, naming the tensors.

Tensors are streamed one at a time, so peak host memory beyond the model itself is one tensor.
Quantized weights (FP8 with their scales, MXFP4 blocks with theirs: each method's reader in
`models.quant.READERS`) are kept in their format where the engine runs them quantized
(`plan_quantized` decides which parameters, from the checkpoint's headers, before loading:
expert stacks, attention and MLA projections, shared experts, the LM head) and written into
their `QParam` slice by slice; the others are dequantized as they stream, and named in the log.
Layers past `num_hidden_layers` (multi-token-prediction modules of DeepSeek-V3 and GLM-4.5) and
`mtp` modules are skipped with a log line, unless the weight map names them (`load_model(..., mtp=True)` adds the MTP layers' entries: models/mtp.py).
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

from models.kernels.quant import QuantWeight, row_index
from models.quant import QuantSpec, reader_for
from models.quant.formats import FormatError, QTensor, WeightFormat
from models.quant.weights import QParam
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


def _dequantized(reader, q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight's float tensor in the layout an unquantized checkpoint stores it (gpt-oss's
    experts: [E, in, out], the transpose of the quantized rows)."""
    w = q.dequant(dtype)
    return w.transpose(-1, -2) if getattr(reader, "unquantized_layout_transposed", False) else w


def iter_tensors(path: str, progress: bool = True, quant: QuantSpec | None = None,
                 dtype: torch.dtype = torch.float32, keep: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
    """(name, tensor) in checkpoint order, one at a time. A quantized weight comes out under the
    name an unquantized checkpoint would give it, read with its scales by its method's reader
    (`models.quant.READERS`): as a `QTensor` with `keep`, else dequantized (to `dtype`) in the
    unquantized checkpoint's layout. Its scale tensors are consumed, not yielded."""
    files = checkpoint_files(path)
    reader = reader_for(quant) if quant is not None else None
    if quant is not None and reader is None:
        raise CheckpointError(f"no reader for quantization method {quant.reader_key}")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        where = {name: i for i, h in enumerate(handles) for name in h.keys()}  # name -> file index
        groups = reader.group(where.keys()) if reader is not None else {}
        members = {m for ms in groups.values() for m in ms}
        primary = {ms[0]: w for w, ms in groups.items()}  # read the group when its first tensor comes
        unused = 0
        for handle in tqdm(handles, desc="loading shards", unit="shard", disable=not progress or len(files) < 2):
            for name in handle.keys():
                if name in primary:
                    weight = primary[name]
                    tensors = {m: handles[where[m]].get_tensor(m) for m in groups[weight]}
                    try:
                        q = reader.assemble(weight, tensors)
                    except FormatError as e:
                        raise CheckpointError(f"{weight}: {e}") from None
                    del tensors
                    yield weight, (q if keep else _dequantized(reader, q, dtype))
                    continue
                if name in members:
                    continue
                if quant is not None and name.endswith(UNUSED_SCALES):
                    unused += 1
                    continue
                tensor = handle.get_tensor(name)
                if quant is not None and tensor.dtype in FP8_DTYPES:
                    raise CheckpointError(f"fp8 tensor {name} has no {name}_scale_inv / {name}_scale")
                yield name, tensor
        if unused:
            log.info("ignored %d activation / KV-cache scale tensors (compute runs in the model dtype)", unused)


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's shape, from the files' headers (no data read)."""
    return {n: shape for n, (shape, _) in tensor_headers(path).items()}


def tensor_headers(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every checkpoint tensor's (shape, safetensors dtype name: "F16", "I32", ...), from the
    files' headers (no data read)."""
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in checkpoint_files(path)]
        return {n: (tuple(sl.get_shape()), str(sl.get_dtype())) for h in handles for n in h.keys()
                for sl in (h.get_slice(n),)}


def _rows_index(index: tuple, shape: tuple[int, ...], bias_column: bool) -> tuple | None:
    """A loader index into a parameter of `shape` as an index over its leading dims and rows
    (None: it selects input columns other than the whole weight's, or the bias column)."""
    if len(index) < len(shape):
        return index
    last = index[-1]
    K = shape[-1] - (1 if bias_column else 0)
    if isinstance(last, slice) and last.indices(shape[-1])[:2] == (0, K) and last.indices(shape[-1])[2] == 1:
        return index[:-1]
    return None


def plan_quantized(path: str, weight_map: WeightMap, quant: QuantSpec | None, candidates: dict[str, tuple],
                   fp8: bool = False) -> tuple[dict[str, tuple], list[str]]:
    """Which of `candidates` ({parameter name: (shape, has a bias column)}: the linears and expert
    stacks the engine can run quantized) the loader keeps quantized, decided from the checkpoint's
    headers before reading any data: {name: (format, block, bias column, extras)}, and the parameters
    a quantized checkpoint fills that stay float (dequantized at load), each with its reason. A reader
    says a weight's format with `describe(name, shapes, dtypes) -> (format, shape, block[, extras])`
    (`extras`: `models.quant.weights.empty_qtensor`'s group / zero / scale_dtype, int4_group).

    A parameter is kept quantized when every weight filling it is quantized in one format (FP8
    per tensor and per channel together: per channel), each fills whole rows (FP8 blocks: whole
    blocks of rows) and each transform has a quantized form (`transform.qtensor`, a function of
    the QTensor; `transform.permutes_rows`: not over FP8 blocks). With `fp8` (--quantization fp8),
    a parameter filled by float weights only is kept as fp8_channel."""
    reader = reader_for(quant) if quant is not None else None
    headers = tensor_headers(path)
    shapes = {n: shape for n, (shape, _) in headers.items()}
    aliases: dict[str, str] = getattr(weight_map, "aliases", {})
    described: dict[str, tuple] = {}
    if reader is not None:
        for weight, ms in reader.group(shapes.keys()).items():
            describe = getattr(reader, "describe", None)
            info = describe(weight, {m: shapes[m] for m in ms}, {m: headers[m][1] for m in ms}) \
                if describe else (None, None, None)
            described[aliases.get(weight, weight)] = info
    by_param: dict[str, list[tuple[str, tuple]]] = {}
    for name, entry in weight_map.items():
        if entry[0] in candidates:
            by_param.setdefault(entry[0], []).append((name, entry))
    kept: dict[str, tuple] = {}
    fallback: list[str] = []
    for param, entries in by_param.items():
        shape, bias_column = candidates[param]
        weights, reason = [], None
        for name, entry in entries:
            index = tuple(entry[1])
            if bias_column and len(index) == len(shape) and isinstance(index[-1], int):
                continue  # the bias column: a float tensor beside the quantized weight
            rows = _rows_index(index, shape, bias_column)
            if rows is None:
                reason = f"{name} fills columns"
            weights.append((name, rows, entry[2] if len(entry) > 2 else None))
        quantized = [w for w in weights if w[0] in described]
        if not quantized:
            if fp8 and reason is None:  # float tensors are transformed, then quantized per row
                kept[param] = (WeightFormat.FP8_CHANNEL, None, bias_column, {})
            continue
        fmts = {described[n][0] for n, _, _ in quantized}
        blocks = {described[n][2] for n, _, _ in quantized}
        if None in fmts:  # a reader without `describe` (the int readers): its format at the first write
            fmt = None
        elif fmts <= {WeightFormat.FP8_TENSOR, WeightFormat.FP8_CHANNEL}:
            whole = all(not rows or all(isinstance(r, int) for r in rows) for _, rows, _ in quantized)
            fmt = WeightFormat.FP8_TENSOR if fmts == {WeightFormat.FP8_TENSOR} and whole else WeightFormat.FP8_CHANNEL
        else:
            fmt = fmts.pop() if len(fmts) == 1 else None
            if fmt is None:
                reason = reason or f"weights in several formats ({', '.join(sorted(f.value for f in fmts))})"
        if len(quantized) < len(weights):
            reason = reason or f"{len(weights) - len(quantized)} of its weights are not quantized"
        if len(blocks) > 1:
            reason = reason or "weights with different blocks"
        block = next(iter(blocks))
        for name, rows, transform in quantized:
            if transform is not None and getattr(transform, "qtensor", None) is None:
                reason = reason or f"{name} needs a transform of the float weight"
            elif transform is not None and fmt == WeightFormat.FP8_BLOCK and getattr(transform, "permutes_rows", False):
                reason = reason or f"{name}: its row permutation splits fp8 blocks"
            if fmt == WeightFormat.FP8_BLOCK and rows and len(rows) >= len(shape) - 1:
                r = rows[len(shape) - 2]
                bn, N = block[0], shape[-2]
                start, stop, _ = r.indices(N) if isinstance(r, slice) else (r, r + 1, 1)
                if start % bn or (stop % bn and stop != N):
                    reason = reason or f"{name} fills rows {start}:{stop}, not whole fp8 blocks of {bn}"
        if reason is not None or fmt is None:
            fallback.append(f"{param} ({reason or 'format known only when read'})")
            continue
        extras = {(k, v) for n, _, _ in quantized for k, v in (described[n][3] if len(described[n]) > 3 else {}).items()}
        if len({k for k, _ in extras}) < len(extras):
            fallback.append(f"{param} (weights with different {sorted(k for k, _ in extras)})")
            continue
        kept[param] = (fmt, block, bias_column, dict(extras))
    return kept, fallback


def _skipped(name: str, num_layers: int) -> bool:
    """Modules beyond the served model: extra (multi-token-prediction) layers and `mtp` modules."""
    m = _LAYER.match(name)
    return (m is not None and int(m.group(1)) >= num_layers) or _MTP.search(name) is not None


def load_weights(model: torch.nn.Module, path: str, weight_map: WeightMap, progress: bool = True,
                 quant: QuantSpec | None = None, quantized: dict[str, QuantWeight] | None = None,
                 qparams: dict[str, QParam] | None = None) -> None:
    """Stream the checkpoint into the model's parameters; those named in `quantized`
    (--quantization int8|int4: the parameter is a shape on the meta device) are quantized tensor by
    tensor into their `QuantWeight` instead, so that no float copy of them is ever whole. Those
    named in `qparams` (a quantized checkpoint's weights kept in their format, `plan_quantized`;
    --quantization fp8) are written, slice by slice, into their `QParam`; a quantized weight of any
    other parameter is dequantized as it streams."""
    params = dict(model.named_parameters(remove_duplicate=False))
    quantized = quantized or {}
    qparams = qparams or {}
    reader = reader_for(quant) if quant is not None else None
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
    dequantized: list[str] = []
    aliases: dict[str, str] = getattr(weight_map, "aliases", {})  # another release's name -> the table's
    for name, tensor in iter_tensors(path, progress, quant, dtype, keep=bool(qparams)):
        name = aliases.get(name, name)
        entry = weight_map.get(name)
        if entry is None:
            if _skipped(name, num_layers):
                skipped += 1
            elif not name.endswith(IGNORED_SUFFIXES):
                unexpected.append(name)
            continue
        param_name, index = entry[0], entry[1]
        if isinstance(tensor, QTensor):
            if param_name not in qparams:  # a weight the engine keeps in float: dequantized here
                tensor = _dequantized(reader, tensor, dtype)
                dequantized.append(name)
            else:
                holder = qparams[param_name]
                q = tensor if len(entry) < 3 else entry[2].qtensor(tensor)
                rows = _rows_index(tuple(index), holder.param_shape, holder.bias is not None)
                dest = params[param_name].data[index] if index else params[param_name].data
                if rows is None or tuple(dest.shape) != tuple(q.shape):
                    mismatched.append(f"{name}: checkpoint {tuple(q.shape)} vs expected {tuple(dest.shape)}")
                    continue
                if not _finite(q):
                    non_finite.append(name)
                    continue
                try:
                    holder.write(rows, q)
                except FormatError as e:
                    raise CheckpointError(f"{name}: {e}") from None
                seen.add(name)
                continue
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
        if param_name in qparams:  # --quantization fp8 (quantized per channel), or gpt-oss's bias column
            holder = qparams[param_name]
            rows = index if holder.is_bias_index(tuple(index)) else _rows_index(
                tuple(index), holder.param_shape, holder.bias is not None)
            if rows is None:
                mismatched.append(f"{name}: fills columns of {param_name}, which is kept quantized in rows")
                continue
            holder.write(tuple(rows), tensor)
            seen.add(name)
            continue
        dest.copy_(tensor.to(dest.dtype))
        seen.add(name)
    if dequantized:
        log.info("dequantized at load (kept in the compute dtype): %d quantized weights: %s", len(dequantized),
                 _names(dequantized))
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


def _finite(q: QTensor) -> bool:
    """No NaN or infinity among a quantized weight's values and scales (E8M0 255 is NaN)."""
    if q.data.dtype in FP8_DTYPES and not bool(torch.isfinite(q.data.to(torch.float16)).all()):
        return False
    if q.fmt == WeightFormat.MXFP4:
        return not bool((q.scale == 255).any())
    return not q.scale.is_floating_point() or bool(torch.isfinite(q.scale).all())


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
