"""An MoE layer's expert stack kept in a checkpoint's quantized format, as expert placement moves it.

`QStack` pairs a stack's `QTensor` ([E, N, K]: data and scales, zero points where the format has
them) with the biases that ride beside it (gpt-oss: [E, N], float). Placement selects experts of
it (`select`: the quantized tensors of those experts, never a dequantized copy), moves them between
devices (`to`) and joins slices (`cat`); `nbytes` is what it holds. The placement executor's
per-device expert function computes over it with `models.quant.ops.qmoe`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models.quant.formats import QTensor, WeightFormat


@dataclass(frozen=True)
class QStack:
    q: QTensor  # [E, N, K]
    bias: torch.Tensor | None = None  # [E, N]

    @classmethod
    def of(cls, param) -> QStack:
        """From a `models.quant.weights.QParam` (its QTensor and biases, not copied)."""
        return cls(param.q, param.bias)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical float stack [E, N, K] (the bias column not included)."""
        return tuple(self.q.shape)

    @property
    def fmt(self) -> WeightFormat:
        return WeightFormat(self.q.fmt)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def expert_bytes(self) -> int:
        """Bytes of one expert (its quantized tensors, scales and bias)."""
        return self.nbytes // max(self.shape[0], 1)

    def __len__(self) -> int:
        return self.shape[0]

    def select(self, idx: torch.Tensor) -> QStack:
        """The experts `idx` [n] (on the stack's device, or moved there) in the same format."""
        idx = idx.to(self.device)
        return QStack(self.q[idx], None if self.bias is None else self.bias.index_select(0, idx))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QStack:
        q = self.q
        moved = replace(q, data=q.data.to(device, non_blocking=non_blocking),
                        scale=q.scale.to(device, non_blocking=non_blocking),
                        zero=None if q.zero is None else q.zero.to(device, non_blocking=non_blocking))
        return QStack(moved, None if self.bias is None else self.bias.to(device, non_blocking=non_blocking))

    def map(self, fn) -> QStack:
        """Each tensor through `fn` (e.g. pinning host memory)."""
        q = self.q
        return QStack(replace(q, data=fn(q.data), scale=fn(q.scale), zero=None if q.zero is None else fn(q.zero)),
                      None if self.bias is None else fn(self.bias))

    @staticmethod
    def cat(parts: list[QStack]) -> QStack:
        """Stacks of one format joined along the expert dim."""
        first = parts[0].q
        data = torch.cat([p.q.data for p in parts])
        zero = None if first.zero is None else torch.cat([p.q.zero for p in parts])
        q = replace(first, shape=(data.shape[0],) + tuple(first.shape[1:]), data=data,
                    scale=torch.cat([p.q.scale for p in parts]), zero=zero)
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return QStack(q, bias)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.q.tensors() + (() if self.bias is None else (self.bias,))


# on the CPU, up to this many pairs per expert of a stack are computed pair by pair (`qmoe_pairs`:
# nothing read back, at most this many times the dequantization of the reference's worst case);
# more take `qmoe`'s reference (the per-expert counts read on the host)
SYNC_FREE_PAIRS_PER_EXPERT = 4


def qmoe_stack(x: torch.Tensor, w13: QStack, w2: QStack, topk_ids: torch.Tensor, topk_w: torch.Tensor,
               variant=None) -> torch.Tensor:
    """A layer's experts over quantized stacks (`variant`: the family's `ExpertVariant`: gpt-oss's
    clamped SwiGLU, Llama 4's input scaling; the biases ride on the stacks) -> [T, H] in x.dtype."""
    from models.quant.ops import cpu_fp8_serves, qmoe, qmoe_pairs

    kw = dict(b13=w13.bias, b2=w2.bias, limit=None if variant is None else variant.limit,
              alpha=1.702 if variant is None else variant.alpha,
              weight_on_input=variant is not None and variant.weight_on_input)
    if x.device.type == "cpu" and topk_ids.numel() <= SYNC_FREE_PAIRS_PER_EXPERT * len(w13) and not cpu_fp8_serves(
            x, w13.q, w2.q):  # (the C fp8 kernel reads nothing back either: the ids are on the host)
        return qmoe_pairs(x, w13.q, w2.q, topk_ids, topk_w, **kw)
    return qmoe(x, w13.q, w2.q, topk_ids, topk_w, **kw)
