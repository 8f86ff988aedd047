"""Length distributions for prompts and outputs: fixed, uniform, normal (clipped).

Spec strings (CLI):  `128`  |  `fixed:128`  |  `uniform:64:256`  |  `normal:128:32[:16:512]`
(normal: mean, std, optional clip bounds; default bounds are [1, mean + 4 std]). Samples are
integers >= 1 drawn from a caller-supplied `random.Random`, so a seed fixes the workload.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class DistError(ValueError):
    pass


@dataclass(frozen=True)
class LengthDist:
    kind: str  # fixed | uniform | normal
    a: float  # fixed: value; uniform: low; normal: mean
    b: float = 0.0  # uniform: high (inclusive); normal: std
    lo: int = 1  # clip bounds (normal)
    hi: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal"):
            raise DistError(f"unknown distribution {self.kind!r} (fixed, uniform, normal)")
        if self.kind == "fixed" and self.a < 1:
            raise DistError("a fixed length must be >= 1")
        if self.kind == "uniform" and not (1 <= self.a <= self.b):
            raise DistError("uniform:LOW:HIGH needs 1 <= LOW <= HIGH")
        if self.kind == "normal" and (self.a < 1 or self.b < 0 or not (1 <= self.lo <= self.hi)):
            raise DistError("normal:MEAN:STD[:LO:HI] needs MEAN >= 1, STD >= 0, 1 <= LO <= HI")

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        if isinstance(spec, int):
            return cls("fixed", spec)
        parts = str(spec).strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            kind, nums = parts[0].lower(), [float(p) for p in parts[1:]]
            if kind == "fixed" and len(nums) == 1:
                return cls("fixed", int(nums[0]))
            if kind == "uniform" and len(nums) == 2:
                return cls("uniform", int(nums[0]), int(nums[1]))
            if kind == "normal" and len(nums) in (2, 4):
                mean, std = nums[0], nums[1]
                lo, hi = (int(nums[2]), int(nums[3])) if len(nums) == 4 else (1, max(1, int(mean + 4 * std)))
                return cls("normal", mean, std, lo, hi)
        except ValueError as e:
            if isinstance(e, DistError):
                raise
            raise DistError(f"bad length spec {spec!r}: {e}") from None
        raise DistError(f"bad length spec {spec!r}: use N, fixed:N, uniform:LOW:HIGH or normal:MEAN:STD[:LO:HI]")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return int(min(self.hi, max(self.lo, round(rng.gauss(self.a, self.b)))))

    @property
    def max(self) -> int:
        return int(self.a) if self.kind == "fixed" else int(self.b) if self.kind == "uniform" else self.hi

    @property
    def mean(self) -> float:
        return float(self.a) if self.kind != "uniform" else (self.a + self.b) / 2

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"normal:{self.a:g}:{self.b:g}:{self.lo}:{self.hi}"
