"""The grammar compiler's budgets (ServerConfig's --grammar-* flags map onto them)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class GrammarLimits:
    timeout: float = 10.0  # seconds one compile may take (its process is killed past it)
    cache_bytes: int = 512 * 2**20  # compiled grammars kept; one grammar may take a quarter of it
    workers: int = DEFAULT_WORKERS  # compile processes
    queue_per_worker: int = 8  # distinct specs that may wait per compile process (429 past it)

    def __post_init__(self) -> None:
        if isinstance(self.timeout, bool) or not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError("the grammar compile timeout must be a finite number of seconds > 0")
        if self.cache_bytes < 4 * 2**20:
            raise ValueError("the grammar cache needs at least 4 MiB")
        if not 1 <= self.workers <= 64 or self.queue_per_worker < 1:
            raise ValueError("grammar compile workers must be in [1, 64]")

    @property
    def max_grammar_bytes(self) -> int:
        """One compiled grammar's limit (a 400 past it)."""
        return self.cache_bytes // 4
