"""Fault injection for tests: make engine steps of a real server process raise on demand.

    MOE_SERVE_FAULT_INJECT="every=N[,after=K][,times=M][,token=T]"

- `every=N`: raise in every N-th step that has work (`every=1`: every step, so the engine is
  declared dead after its consecutive-failure limit);
- `after=K`: leave the first K steps alone;
- `times=M`: raise at most M times in all;
- `token=T`: raise only in steps whose batch holds a sequence whose *prompt* contains token id
  T (a "poison" request: the test decides which requests are hit).
At least one of `every` and `token` is needed; `token` alone means every step that holds it.

`install_from_env(core)` reads the variable and sets `core.fault_hook` (the native EngineCore
calls it with the scheduled batch before the forward); it does nothing when the variable is
unset or empty. A test tool, outside the production import path: only the test entry point
`python -m tests.loadtest.fault_server` installs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_VAR = "MOE_SERVE_FAULT_INJECT"
log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """The exception an injected fault raises inside an engine step."""


@dataclass
class FaultInjector:
    every: int = 0  # 0: not by count
    after: int = 0
    times: int | None = None
    token: int | None = None
    steps: int = 0  # steps with work seen so far
    injected: int = 0

    def __post_init__(self) -> None:
        if self.every < 0 or self.after < 0 or (self.times is not None and self.times < 0):
            raise ValueError(f"{ENV_VAR}: every, after and times must be >= 0")
        if not self.every and self.token is None:
            raise ValueError(f"{ENV_VAR}: needs every=N or token=T")

    @classmethod
    def parse(cls, spec: str) -> FaultInjector:
        fields: dict[str, int] = {}
        for part in spec.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("every", "after", "times", "token"):
                raise ValueError(f"{ENV_VAR}: bad item {part!r} (every=N, after=K, times=M, token=T)")
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {key} needs an integer, not {value!r}") from None
        return cls(**fields)

    def __call__(self, scheduled: list[Any]) -> None:
        self.steps += 1
        if self.steps <= self.after:
            return
        if self.times is not None and self.injected >= self.times:
            return
        if self.every and (self.steps - self.after) % self.every:
            return
        if self.token is not None and not any(self._poisoned(item) for item in scheduled):
            return
        self.injected += 1
        raise InjectedFault(f"injected fault #{self.injected} at step {self.steps} ({ENV_VAR})")

    def _poisoned(self, item: Any) -> bool:
        seq = getattr(item, "seq", item)
        return self.token in seq.token_ids[: seq.num_prompt_tokens]


def install_from_env(core: Any, environ: Mapping[str, str] | None = None) -> FaultInjector | None:
    """Set `core.fault_hook` from MOE_SERVE_FAULT_INJECT; returns the injector (None when unset)."""
    spec = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not spec:
        return None
    injector = FaultInjector.parse(spec)
    core.fault_hook = injector
    log.warning("fault injection is ON (%s=%r): engine steps will fail on purpose", ENV_VAR, spec)
    return injector
