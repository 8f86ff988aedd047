"""Weights kept quantized on the CPU: int8 and int4 formats for the C kernels (csrc/quant_gemm.h).

Formats (round to nearest, llama.cpp-like; `FORMATS`), a weight [..., N, K] with K a multiple of 32:
- `int8`: int8 per group of 32 along K with a float16 scale (Q8_0: 34 bytes per 32 weights);
- `int8_channel`: int8 with one float16 scale per output row;
- `int4`: symmetric int4 per group of 32, float16 scale, w = d * (q - 8) (Q4_0: 18 bytes per 32);
- `int4_zp`: int4 per group of 32 with a zero point, w = d * q + m, float16 d and m (Q4_1: 20 bytes).
`QuantWeight` holds one weight (or a stack of experts' weights) in its format, in the kernels'
order (`to_kernel_order`, csrc/quant_gemm.h: groups of 8 rows, each block's 8 rows x 4 weights
side by side, the scales of a block's 8 rows together; the row-major shapes, output sizes a
multiple of 8): a checkpoint tensor filling some rows (whole groups) is quantized, reordered and
written on its own as the loader streams it (`write`): the float weight never exists whole, and
the kernels read the stored bytes as they are, at every batch size. The kernels quantize the
activations per row on the fly, in blocks of 32 (int8), and accumulate in float32.

Besides, `bf16` (`BF16`, not a --quantization choice: `--dtype auto` keeps a bf16 checkpoint's
weights so on the CPU, models/build.py): the bf16 values as they are, float32 math in the C
kernels; a linear's weight [N, K] in the panels of csrc/linear_bf16_cpu.c ([N/16, ceil(K/2), 16,
2]: `bf16_panels`), an MoE layer's stacks [E, N, K] row-major (csrc/moe_bf16_cpu.c).

Instruction-set levels of the quantized kernels (`ISA_LEVELS`): the best the CPU runs is chosen
at load; `MOE_SERVE_CPU_ISA=avx2|avx512|avx512vnni|avx512bf16` forces a lower one (`select_isa`;
the bf16 kernels have levels avx2, avx512 and avx512bf16 and run the highest not above it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

FORMATS: dict[str, int] = {"int8": 0, "int8_channel": 1, "int4": 2, "int4_zp": 3}  # name -> csrc format code
QUANTIZATIONS = tuple(FORMATS)  # --quantization choices
GROUP = 32
ISA_LEVELS: dict[str, int] = {"avx2": 1, "avx512": 2, "avx512vnni": 3, "avx512bf16": 4}
BF16 = "bf16"  # bf16 weights, float32 math (csrc/linear_bf16_cpu.c, moe_bf16_cpu.c)
BF16_PANEL = 16  # the bf16 linear kernel's panel width: output sizes must be multiples of it
QGROUP = 8  # int8/int4 weight rows stored together in the kernel order (csrc/quant_gemm.h QGROUP)
ISA_ENV = "MOE_SERVE_CPU_ISA"


class QuantError(ValueError):
    pass


def bytes_per_weight(fmt: str, K: int) -> float:
    """Resident bytes per weight element of a row of K in format `fmt` (values + scales)."""
    if fmt == BF16:
        return 2.0  # (a linear's panels pad an odd K by one element a row: not counted)
    if fmt == "int8":
        return 1 + 2 / GROUP
    if fmt == "int8_channel":
        return 1 + 2 / K
    if fmt == "int4":
        return 0.5 + 2 / GROUP
    if fmt == "int4_zp":
        return 0.5 + 4 / GROUP
    raise QuantError(f"unknown quantized format {fmt!r} (one of {', '.join(FORMATS)})")


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [..., N, K] float -> (q uint8 [..., N, K] or [..., N, K/2], scales fp16 [..., N, K/32 or 1],
    minimums fp16 [..., N, K/32] or None). Scales are rounded to float16 before the values are
    quantized against them: the kernels compute with exactly `dequantize`'s weights."""
    K = w.shape[-1]
    if K % GROUP:
        raise QuantError(f"quantized formats need an input size that is a multiple of {GROUP}, got {K}")
    x = w.detach().float()
    lead = x.shape[:-1]
    if fmt == "int8_channel":
        d = (x.abs().amax(dim=-1, keepdim=True) / 127).half()
        df = d.float()
        q = torch.where(df > 0, torch.round(x / df), 0.0).clamp(-127, 127).to(torch.int8)
        return q.view(torch.uint8), d, None
    b = x.reshape(*lead, K // GROUP, GROUP)
    if fmt == "int8":
        d = (b.abs().amax(dim=-1, keepdim=True) / 127).half()
        df = d.float()
        q = torch.where(df > 0, torch.round(b / df), 0.0).clamp(-127, 127).to(torch.int8)
        return q.reshape(*lead, K).view(torch.uint8), d.reshape(*lead, K // GROUP), None
    if fmt == "int4":
        idx = b.abs().argmax(dim=-1, keepdim=True)
        d = (torch.gather(b, -1, idx) / -8).half()  # the value of largest magnitude maps to -8
        df = d.float()
        q = (torch.where(df != 0, torch.round(b / df), 0.0) + 8).clamp(0, 15).to(torch.uint8)
        return _nibbles(q, lead, K), d.reshape(*lead, K // GROUP), None
    if fmt == "int4_zp":
        mn, mx = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
        d, m = ((mx - mn) / 15).half(), mn.half()
        df, mf = d.float(), m.float()
        q = torch.where(df > 0, torch.round((b - mf) / df), 0.0).clamp(0, 15).to(torch.uint8)
        return _nibbles(q, lead, K), d.reshape(*lead, K // GROUP), m.reshape(*lead, K // GROUP)
    raise QuantError(f"unknown quantized format {fmt!r} (one of {', '.join(FORMATS)})")


def _nibbles(q: torch.Tensor, lead, K: int) -> torch.Tensor:
    """q [..., nb, 32] in 0..15 -> [..., K/2]: byte i of a block holds element i (low) and i + 16 (high)."""
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(*lead, K // 2)


def dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The float32 weights a quantized weight stands for (the kernels' exact operand)."""
    if fmt in ("int8", "int8_channel"):
        v = q.view(torch.int8).float()
        lead, K = v.shape[:-1], v.shape[-1]
        s = d.float().repeat_interleave(GROUP, dim=-1) if fmt == "int8" else d.float()
        return (v * s).reshape(*lead, K)
    lead, K = q.shape[:-1], 2 * q.shape[-1]
    b = q.reshape(*lead, K // GROUP, 16)
    v = torch.cat([b & 0x0F, b >> 4], dim=-1).float()  # [..., nb, 32]
    df = d.float().unsqueeze(-1)
    w = df * (v - 8) if fmt == "int4" else df * v + m.float().unsqueeze(-1)
    return w.reshape(*lead, K)


def check_output_rows(shape: tuple[int, ...]) -> None:
    """int8/int4 weights [..., N, *] are stored in groups of QGROUP rows: N must be a multiple."""
    if len(shape) < 2 or shape[-2] % QGROUP:
        raise QuantError(f"quantized formats need an output size that is a multiple of {QGROUP}, got {shape}")


def to_kernel_order(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                    fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`quantize`'s row-major (q, scales, minimums) [..., N, *] -> the kernels' order, same shapes
    (N a multiple of QGROUP; csrc/quant_gemm.h). Per group of 8 rows and block b: int8, for each
    group g of 4 along k, the 8 rows' 4 values side by side (byte 32 g + 4 c + j = W[c, 32 b + 4 g
    + j]); int4, the same with groups g and g + 4 in the low and high nibbles of 4 such runs; the
    scales (and minimums) of the block's 8 rows side by side."""
    check_output_rows(tuple(q.shape))
    *lead, N, KB = q.shape
    G = N // QGROUP
    if fmt in ("int8", "int8_channel"):
        nb = KB // GROUP
        out = q.reshape(*lead, G, QGROUP, nb, 8, 4).transpose(-4, -3).transpose(-3, -2)
    else:
        nb = 2 * KB // GROUP
        b = q.reshape(*lead, N, nb, 16)
        v = torch.cat([b & 0x0F, b >> 4], dim=-1)  # [..., N, nb, 32]: the values in k order
        v = v.reshape(*lead, G, QGROUP, nb, 8, 4).transpose(-4, -3).transpose(-3, -2)  # [.., G, nb, g, c, j]
        out = v[..., :4, :, :] | (v[..., 4:, :, :] << 4)
    return out.reshape(q.shape).contiguous(), _scales_to_kernel(d), None if m is None else _scales_to_kernel(m)


def from_kernel_order(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                      fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`to_kernel_order`'s inverse: the row-major (q, scales, minimums) of `quantize`."""
    *lead, N, KB = q.shape
    G = N // QGROUP
    if fmt in ("int8", "int8_channel"):
        nb = KB // GROUP
        out = q.reshape(*lead, G, nb, 8, QGROUP, 4).transpose(-3, -2).transpose(-4, -3)
    else:
        nb = 2 * KB // GROUP
        x = q.reshape(*lead, G, nb, 4, QGROUP, 4)
        v = torch.cat([x & 0x0F, x >> 4], dim=-3)  # [.., G, nb, g, c, j]
        v = v.transpose(-3, -2).transpose(-4, -3).reshape(*lead, N, nb, 32)
        out = v[..., :16] | (v[..., 16:] << 4)
    return out.reshape(q.shape).contiguous(), _scales_from_kernel(d), None if m is None else _scales_from_kernel(m)


def _scales_to_kernel(d: torch.Tensor) -> torch.Tensor:
    *lead, N, S = d.shape
    return d.reshape(*lead, N // QGROUP, QGROUP, S).transpose(-1, -2).reshape(d.shape).contiguous()


def _scales_from_kernel(d: torch.Tensor) -> torch.Tensor:
    *lead, N, S = d.shape
    return d.reshape(*lead, N // QGROUP, S, QGROUP).transpose(-1, -2).reshape(d.shape).contiguous()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 as the kernels see it: int8 per block of 32 (d = max|x| / 127), dequantized."""
    b = x.float().reshape(x.shape[0], -1, GROUP)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, 0.0)
    return (torch.round(b * inv) * d).reshape(x.shape)


def bf16_panels(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] (N a multiple of 16) -> bf16 panels [N/16, ceil(K/2), 16, 2]: W[n, k] at
    [n // 16, k // 2, n % 16, k % 2], an odd K's last pair padded with 0 (csrc/linear_bf16_cpu.c)."""
    N, K = w.shape
    b = torch.nn.functional.pad(w.detach().to(torch.bfloat16), (0, K % 2))
    return b.reshape(N // BF16_PANEL, BF16_PANEL, -1, 2).permute(0, 2, 1, 3).contiguous()


def bf16_unpanel(p: torch.Tensor, K: int) -> torch.Tensor:
    """`bf16_panels`'s inverse: [N/16, ceil(K/2), 16, 2] -> [N, K] bf16."""
    P, K2 = p.shape[0], p.shape[1]
    return p.permute(0, 2, 1, 3).reshape(P * BF16_PANEL, 2 * K2)[:, :K]


@dataclass
class QuantWeight:
    """A weight [..., N, K] (a linear's, or an MoE layer's stack [E, N, K]) in a quantized format."""

    fmt: str
    shape: tuple[int, ...]  # the float weight's shape
    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    @classmethod
    def empty(cls, shape: tuple[int, ...], fmt: str) -> QuantWeight:
        *lead, K = shape
        if fmt == BF16:  # a linear's weight in panels, a stack of experts' row-major
            if len(shape) == 2 and shape[0] % BF16_PANEL:
                raise QuantError(f"bf16 linear weights need an output size that is a multiple of {BF16_PANEL}, "
                                 f"got {shape[0]}")
            q = (torch.zeros(shape[0] // BF16_PANEL, (K + 1) // 2, BF16_PANEL, 2, dtype=torch.bfloat16)
                 if len(shape) == 2 else torch.zeros(*shape, dtype=torch.bfloat16))
            return cls(fmt, tuple(shape), q, torch.zeros(0, dtype=torch.float16), None)
        if K % GROUP:
            raise QuantError(f"quantized formats need an input size that is a multiple of {GROUP}, got {K}")
        check_output_rows(tuple(shape))
        q = torch.zeros(*lead, K if fmt.startswith("int8") else K // 2, dtype=torch.uint8)
        s = torch.zeros(*lead, 1 if fmt == "int8_channel" else K // GROUP, dtype=torch.float16)
        return cls(fmt, tuple(shape), q, s, torch.zeros_like(s) if fmt == "int4_zp" else None)

    @classmethod
    def of(cls, w: torch.Tensor, fmt: str) -> QuantWeight:
        if fmt == BF16:
            out = cls.empty(tuple(w.shape), fmt)
            out.write((), w)
            return out
        check_output_rows(tuple(w.shape))  # before quantizing the whole weight
        q, s, m = to_kernel_order(*quantize(w, fmt), fmt)
        return cls(fmt, tuple(w.shape), q, s, m)

    @property
    def code(self) -> int:
        return FORMATS[self.fmt] if self.fmt != BF16 else -1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.mins) if t is not None)

    def write(self, index: tuple, tensor: torch.Tensor) -> None:
        """Quantize `tensor` into the rows `index` selects (an index over the leading dims and the
        rows, whole rows only: the loader's slices of stacked or fused weights; int formats: whole
        groups of 8 rows)."""
        if self.fmt == BF16:
            self._write_bf16(index, tensor)
            return
        self.write_quantized(index, *quantize(tensor, self.fmt))

    def write_quantized(self, index: tuple, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> None:
        """Write already quantized rows (row-major, as `quantize` gives them: a GGUF file's blocks)
        into the rows `index` selects, reordered for the kernels."""
        self._check_groups(index)
        q, d, m = to_kernel_order(q, d, m, self.fmt)
        self.q[index].copy_(q)
        self.scales[index].copy_(d)
        if m is not None:
            self.mins[index].copy_(m)

    def _check_groups(self, index: tuple) -> None:
        """The rows `index` selects must be whole groups of QGROUP (the kernel order is per group)."""
        if len(index) < len(self.shape) - 1:
            return  # every row of the selected leading entries
        rows = index[len(self.shape) - 2]
        N = self.shape[-2]
        ok = isinstance(rows, slice) and rows.indices(N)[2] == 1
        if ok:
            start, stop, _ = rows.indices(N)
            ok = start % QGROUP == 0 and (stop - start) % QGROUP == 0
        if not ok:
            raise QuantError(f"quantized weights are written in whole groups of {QGROUP} rows, got rows {rows!r} "
                             f"of {N}")

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, scales, minimums) in `quantize`'s row-major order (int formats)."""
        return from_kernel_order(self.q, self.scales, self.mins, self.fmt)

    def _write_bf16(self, index: tuple, tensor: torch.Tensor) -> None:
        if len(self.shape) != 2:  # expert stacks: row-major, as loaded
            self.q[index].copy_(tensor.to(torch.bfloat16))
            return
        N, K = self.shape
        rows = torch.arange(N)[index] if index else torch.arange(N)
        rows = rows.reshape(-1)
        t = torch.nn.functional.pad(tensor.detach().to(torch.bfloat16).reshape(len(rows), K), (0, K % 2))
        view = self.q.permute(0, 2, 1, 3)  # [N/16, 16, ceil(K/2), 2], writes through to q
        view[rows // BF16_PANEL, rows % BF16_PANEL] = t.reshape(len(rows), -1, 2)

    def dequantize(self) -> torch.Tensor:
        if self.fmt == BF16:
            return (bf16_unpanel(self.q, self.shape[1]) if len(self.shape) == 2 else self.q).float()
        return dequantize(*self.rows(), self.fmt)


def row_index(index: tuple, ndim: int) -> bool:
    """Whether a loader index (ints and slices over a weight of `ndim` dims) selects whole rows:
    nothing indexes the last (input) dim."""
    return len(index) < ndim


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias) -> [M, N] (float32), as F.linear over the dequantized weight."""
    if w.fmt == BF16:
        return torch.ops.moe_serve.linear_bf16_cpu(x, w.q, bias)
    return torch.ops.moe_serve.quant_linear_cpu(x, w.q, w.scales, w.mins, w.code, bias)


def quant_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: QuantWeight,
              w2: QuantWeight) -> torch.Tensor:
    """The experts over quantized stacks w13 [E, 2I, H] and w2 [E, H, I], as `fused_experts`."""
    if w13.fmt == BF16:
        return torch.ops.moe_serve.moe_experts_bf16_cpu(x, topk_ids, topk_w, w13.q, w2.q)
    return torch.ops.moe_serve.quant_moe_cpu(x, topk_ids, topk_w, w13.code, w13.q, w13.scales, w13.mins,
                                             w2.q, w2.scales, w2.mins)


def isa() -> tuple[str, str]:
    """(the level the quantized kernels run, the best this CPU runs), after `cpu_ops.load`."""
    names = {v: k for k, v in ISA_LEVELS.items()}
    current, best = torch.ops.moe_serve.quant_isa(-1)
    return names[current], names[best]


def bf16_isa() -> tuple[str, str]:
    """(the level the bf16 linear kernel runs, the best it runs on this CPU), after `cpu_ops.load`."""
    names = {v: k for k, v in ISA_LEVELS.items()}
    current, best = torch.ops.moe_serve.bf16_isa(-1)
    return names[current], names[best]


def set_isa(name: str | None) -> str:
    """Run the quantized and bf16 kernels at level `name` (None or "auto": the best); refused above
    what the CPU runs. Each kernel runs its highest level not above `name` (the quantized ones have
    no avx512bf16 level, the bf16 one no avx512vnni). Returns the level now in use."""
    if name in (None, "", "auto"):
        torch.ops.moe_serve.quant_isa(0)
        torch.ops.moe_serve.bf16_isa(0)
        return isa()[0]
    if name not in ISA_LEVELS:
        raise QuantError(f"{ISA_ENV}={name!r}: one of auto, {', '.join(ISA_LEVELS)}")
    level = ISA_LEVELS[name]
    best_q, best_b = torch.ops.moe_serve.quant_isa(-1)[1], torch.ops.moe_serve.bf16_isa(-1)[1]
    if level > max(best_q, best_b) or (level == ISA_LEVELS["avx512vnni"] and best_q < level):
        names = {v: k for k, v in ISA_LEVELS.items()}
        raise QuantError(f"{ISA_ENV}={name}: this CPU runs at most {names[max(best_q, best_b)]}"
                         + (" (no avx512vnni)" if level == ISA_LEVELS["avx512vnni"] else ""))
    torch.ops.moe_serve.quant_isa(min(level, best_q))
    torch.ops.moe_serve.bf16_isa(min(level, best_b) if level != ISA_LEVELS["avx512vnni"] else ISA_LEVELS["avx512"])
    return name


def select_isa() -> str:
    """The level `MOE_SERVE_CPU_ISA` asks for (default: the best this CPU runs), set and returned."""
    return set_isa(os.environ.get(ISA_ENV))
