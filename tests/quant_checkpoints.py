"""INT4 / INT8 checkpoints for tests, in the layouts the real tools write (issue 27).

Packers, each from the format's documented bit layout, written as the tools write it:
- `gptq_pack`: auto-gptq's `QuantLinear.pack` (qweight [K/8, N] along K, qzeros [G, N/8] along N,
  stored zero minus one in the v1 `checkpoint_format` "gptq", as is in "gptq_v2");
- `awq_pack`: AutoAWQ's `WQLinear_GEMM.from_linear` (qweight [K, N/8], qzeros [G, N/8], both in
  AWQ's interleaved nibble order [0, 2, 4, 6, 1, 3, 5, 7]);
- `ct_compress`: the `compressed-tensors` package's own compressor (`pack-quantized`,
  `int-quantized`), with its own `calculate_qparams`, and `ct_decompress` its own decompressor.
Each returns the integers it packed (or the package's decompressed weight) so that tests compare a
reader's `QTensor.dequant()` against the format's own dequantization.

`quantize_checkpoint(src, dst, method, ...)` turns a tiny unquantized transformers checkpoint
(`tests.models.conftest.make_checkpoint`: Mixtral, Qwen3-MoE, ...) into a GPTQ, AWQ or
compressed-tensors one, quantizing the expert and attention linears as real releases do (routers,
norms, embeddings and lm_head stay as they are), with config.json's `quantization_config` as the
tools write it. It returns the dequantized weights (float32, the checkpoint's names): written with
`write_dequantized`, they make the reference checkpoint an engine parity test compares against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

GPTQ_GROUP_SIZES = (32, 64, 128, -1)


def quantizable(name: str, t: torch.Tensor) -> bool:
    """The linears INT4 releases quantize: attention and MLP / expert projections (not routers,
    norms, embeddings or lm_head)."""
    return (t.dim() == 2 and name.endswith(".weight") and (".self_attn." in name or ".mlp." in name
            or ".block_sparse_moe." in name) and "norm" not in name
            and not name.endswith((".gate.weight", "router.weight", "shared_expert_gate.weight")))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits (numpy's astype(int32))."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def int_quantize(w: torch.Tensor, bits: int, group: int, sym: bool, zero_min: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] unsigned 0..2^bits-1, zero [N, G], scale [N, G] float16) by min / max
    per group (group -1: per output channel); symmetric: zero 2^(bits-1). `zero_min` keeps
    asymmetric zeros at or above it (GPTQ v1 cannot store a zero of 0)."""
    N, K = w.shape
    g = K if group == -1 else group
    if K % g:
        raise ValueError(f"group size {g} does not divide {K} inputs")
    maxq = (1 << bits) - 1
    wg = w.double().reshape(N, K // g, g)
    if sym:
        scale = (wg.abs().amax(-1) / ((maxq + 1) / 2 - 0.5)).clamp(min=1e-6)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-6)
        zero = torch.round(-lo / scale).clamp(zero_min, maxq)
    scale = scale.to(torch.float16)
    q = torch.round(wg / scale.double().unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, maxq)
    return q.reshape(N, K).long(), zero.long(), scale


def gptq_pack(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int = 4,
              checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """q [N, K], zero / scale [N, G] -> GPTQ's qweight [K*bits/32, N], qzeros [G, N*bits/32],
    scales [G, N] float16, g_idx [K] int32 (auto-gptq's pack loops; v1 stores zero - 1)."""
    N, K = q.shape
    G = zero.shape[1]
    per = 32 // bits
    mask = (1 << bits) - 1
    # auto-gptq's loops (`for j in range(i, i + per): qweight[row] |= intweight[j] << (bits * (j - i))`,
    # row by row; qzeros column by column), each word's `per` elements taken at once
    intweight = q.t().long()  # [K, N]
    qweight = torch.zeros(K // per, N, dtype=torch.int64)
    for j in range(per):
        qweight |= intweight[j::per] << (bits * j)
    zeros = zero.t().long() - (1 if checkpoint_format == "gptq" else 0)  # [G, N]
    zeros = zeros & mask
    qzeros = torch.zeros(G, N // per, dtype=torch.int64)
    for j in range(per):
        qzeros |= zeros[:, j::per] << (bits * j)
    g = K // G
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": scale.t().contiguous(),
            "g_idx": (torch.arange(K) // g).to(torch.int32)}


def awq_pack(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """q [N, K], zero / scale [N, G] -> AWQ GEMM's qweight [K, N/8], qzeros [G, N/8], scales
    [G, N] float16 (AutoAWQ's pack loop with its order map)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(cols: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N/8]
        # AutoAWQ's loop (`for col ...: for i ...: qweight[:, col] |= intweight[:, col * 8 + order_map[i]]
        # << (i * 4)`), every column word at once
        out = torch.zeros(cols.shape[0], cols.shape[1] // 8, dtype=torch.int64)
        for i in range(8):
            out |= cols[:, order_map[i]::8] << (i * 4)
        return _to_int32(out)

    return {"qweight": pack(q.t().long()), "qzeros": pack(zero.t().long()), "scales": scale.t().contiguous()}


def int_dequant(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The GPTQ / AWQ dequantization: w[n, k] = (q[n, k] - zero[n, k // g]) * scale[n, k // g], float64."""
    g = q.shape[1] // zero.shape[1]
    return (q.double() - zero.double().repeat_interleave(g, 1)) * scale.double().repeat_interleave(g, 1)


# --------------------------------------------------------------------------------------------
# compressed-tensors, through the package


def ct_scheme(bits: int = 4, strategy: str = "group", group_size: int | None = 32, symmetric: bool = True):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _ct_compressor(fmt: str):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt)


def ct_compress(w: torch.Tensor, scheme, fmt: str = "pack-quantized") -> dict[str, torch.Tensor]:
    """w [N, K] -> the module's compressed tensors (local names: weight_packed, weight_scale, ...)
    made by compressed-tensors: its calculate_qparams over each group's min / max, its compressor."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    N, K = w.shape
    if args.strategy == "group":
        wr = w.reshape(N, K // args.group_size, args.group_size)
    elif args.strategy == "channel":
        wr = w.reshape(N, 1, K)
    else:
        wr = w.reshape(1, 1, N * K)
    scale, zp = calculate_qparams(wr.amin(-1), wr.amax(-1), args)
    if args.strategy == "tensor":
        scale, zp = scale.reshape(1), zp.reshape(1)
    return dict(_ct_compressor(fmt).compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme))


def ct_decompress(tensors: dict[str, torch.Tensor], scheme, fmt: str = "pack-quantized",
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """compressed-tensors' own decompressor (its scale cast to `dtype` first, so that the math runs
    in it): the float weight [N, K]."""
    local = dict(tensors)
    local["weight_scale"] = local["weight_scale"].to(dtype)
    return _ct_compressor(fmt).decompress(local, scheme)["weight"]


def ct_config(scheme, fmt: str, ignore: list[str]) -> dict:
    """config.json's quantization_config, written by compressed-tensors' ModelCompressor."""
    import tempfile

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore,
                            quantization_status=QuantizationStatus.COMPRESSED)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text("{}")
        ModelCompressor(quantization_config=qc).update_config(d)
        return json.loads((Path(d) / "config.json").read_text())["quantization_config"]


# --------------------------------------------------------------------------------------------
# whole checkpoints


def gptq_config(bits: int, group_size: int, sym: bool, checkpoint_format: str = "gptq") -> dict:
    """config.json's quantization_config as transformers' GPTQConfig writes it (GPTQModel backend:
    `format` and `checkpoint_format`)."""
    from transformers import GPTQConfig

    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=checkpoint_format)
    return json.loads(json.dumps(cfg.to_dict()))  # as saved: the method enum as its string


def awq_config(group_size: int) -> dict:
    """As transformers' AwqConfig writes it (GEMM version; MoE routers listed as not converted)."""
    from transformers import AwqConfig

    cfg = AwqConfig(bits=4, group_size=group_size, zero_point=True, version="gemm", modules_to_not_convert=["gate"])
    return json.loads(json.dumps(cfg.to_dict()))


# older writers: optimum / auto-gptq (no `format`), AutoAWQ's quant_config (upper-case version)
OPTIMUM_GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False,
                       "static_groups": False, "sym": True, "true_sequential": True, "model_name_or_path": None,
                       "model_file_base_name": None}
AUTOAWQ_CONFIG = {"quant_method": "awq", "zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}


def _read_all(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from models.loader import checkpoint_files

    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(str(src)):
        out.update(load_file(f))
    return out


def quantize_checkpoint(src, dst, method: str, *, bits: int = 4, group_size: int = 32, sym: bool = True,
                        checkpoint_format: str = "gptq", ct_format: str = "pack-quantized",
                        strategy: str = "group") -> dict[str, torch.Tensor]:
    """Write into `dst` a `method` ("gptq", "awq", "compressed-tensors") copy of the unquantized
    checkpoint `src`; returns the dequantized weights (float32, under the unquantized names) of
    every tensor: the reference model's checkpoint (`write_dequantized`)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    out: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    scheme = ct_scheme(bits, strategy, group_size if strategy == "group" else None, sym) \
        if method == "compressed-tensors" else None
    for name, t in _read_all(src).items():
        if not quantizable(name, t):
            out[name] = t
            reference[name] = t.float()
            continue
        prefix = name[: -len(".weight")]
        w = t.float()
        if method == "gptq":
            q, zero, scale = int_quantize(w, bits, group_size, sym, zero_min=1 if checkpoint_format == "gptq" else 0)
            packed = gptq_pack(q, zero, scale, bits, checkpoint_format)
            reference[name] = int_dequant(q, zero, scale).float()
        elif method == "awq":
            q, zero, scale = int_quantize(w, 4, group_size, sym=False)
            packed = awq_pack(q, zero, scale)
            reference[name] = int_dequant(q, zero, scale).float()
        elif method == "compressed-tensors":
            packed = ct_compress(t.to(torch.bfloat16), scheme, ct_format)
            reference[name] = ct_decompress(packed, scheme, ct_format).float()
        else:
            raise ValueError(f"method {method!r}")
        out.update({f"{prefix}.{k}": v.contiguous() for k, v in packed.items()})
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if method == "gptq":
        qcfg = gptq_config(bits, group_size, sym, checkpoint_format)
    elif method == "awq":
        qcfg = awq_config(group_size)
    else:
        qcfg = ct_config(scheme, ct_format, ignore=["lm_head", "re:.*block_sparse_moe.gate$", "re:.*mlp.gate$"])
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return reference


def write_dequantized(src, dst, reference: dict[str, torch.Tensor]) -> None:
    """The reference checkpoint: `src`'s config (no quantization_config) with the dequantized weights."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in reference.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
