"""Routing traces: JSON lines, one per engine step, written as they come (bounded memory).

Format (version 1):
    {"type": "header", "version": 1, "num_layers": L, "num_experts": E, "top_k": k,
     "hidden_size": H, "expert_bytes": B, "layer_ids": [...]}
    {"step": 0, "tokens": T, "expert_tokens": [[c_00, ..., c_0E-1], ...]}        # L x E counts
    {"step": 1, "tokens": T, "expert_tokens": [...], "token_ids": [[[e, ...], ...], ...]}  # optional T x L x k

`expert_tokens[l][e]` = token-expert assignments of logical expert e in MoE layer l that step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

TRACE_VERSION = 1


@dataclass
class TraceHeader:
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int | None = None
    expert_bytes: int | None = None
    layer_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"type": "header", "version": TRACE_VERSION, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "hidden_size": self.hidden_size,
                "expert_bytes": self.expert_bytes, "layer_ids": self.layer_ids}


class RoutingRecorder:
    """Appends one line per step to `path`; stops (with one log line) after `max_steps`. A routing
    listener of the engine (`on_routing`), beside the placement manager (--record-routing)."""

    @classmethod
    def for_model(cls, path: str, model, record_token_ids: bool = False) -> RoutingRecorder:
        cfg = model.config
        blocks = sorted(model.moe_blocks(), key=lambda b: b.layer_idx)
        if not blocks:
            raise ValueError("the model has no MoE layers to record routing of")
        w13, w2 = blocks[0].w13, blocks[0].w2
        expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        return cls(path, TraceHeader(len(blocks), cfg.num_experts, cfg.top_k, cfg.hidden_size, expert_bytes,
                                     [b.layer_idx for b in blocks]), record_token_ids=record_token_ids)

    def on_routing(self, stats) -> None:
        """Routing listener: one line for this step (RoutingStats)."""
        self.record(stats.expert_tokens, stats.expert_ids, getattr(stats, "zero_expert_tokens", None))

    def __init__(self, path: str, header: TraceHeader, *, record_token_ids: bool = False,
                 max_steps: int | None = None):
        if max_steps is not None and max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        self.path = path
        self.header = header
        self.record_token_ids = record_token_ids
        self.max_steps = max_steps
        self.steps = 0
        self._file = open(path, "w", buffering=1)  # noqa: SIM115 (held open; line-buffered: a crash loses one step)
        self._file.write(json.dumps(header.to_json()) + "\n")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def record(self, expert_tokens, token_ids=None, zero_expert_tokens=None) -> None:
        """expert_tokens: [L][E] counts; token_ids: optional [T, L, k] tensor or nested list;
        zero_expert_tokens: [L] assignments to zero-computation experts (LongCat), or None."""
        if self._file.closed:
            return
        counts = np.asarray(expert_tokens, dtype=np.int64)  # [L, E]
        zero = int(zero_expert_tokens[0]) if zero_expert_tokens else 0
        line = {"step": self.steps, "tokens": (int(counts[0].sum()) + zero) // max(self.header.top_k, 1),
                "expert_tokens": counts.tolist()}
        if zero_expert_tokens is not None:
            line["zero_expert_tokens"] = [int(z) for z in zero_expert_tokens]
        if self.record_token_ids and token_ids is not None:
            line["token_ids"] = token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.steps += 1
        if self.max_steps is not None and self.steps >= self.max_steps:
            log.info("routing trace %s: reached %d steps, recording stopped", self.path, self.steps)
            self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_trace(path: str) -> tuple[TraceHeader, Iterator[np.ndarray]]:
    """(header, iterator of per-step [L, E] int64 count arrays). Streams the file."""
    with open(path) as f:
        first = f.readline()
    if not first:
        raise ValueError(f"{path}: empty routing trace")
    head = json.loads(first)
    if head.get("type") != "header" or head.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: not a version-{TRACE_VERSION} routing trace (first line {first[:80]!r})")
    header = TraceHeader(int(head["num_layers"]), int(head["num_experts"]), int(head["top_k"]),
                         head.get("hidden_size"), head.get("expert_bytes"), list(head.get("layer_ids") or []))

    def steps() -> Iterator[np.ndarray]:
        with open(path) as f:
            next(f)  # the header
            for n, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                counts = np.asarray(json.loads(line)["expert_tokens"], dtype=np.int64)
                if counts.shape != (header.num_layers, header.num_experts):
                    raise ValueError(f"{path}:{n}: expert_tokens shape {counts.shape}, header says "
                                     f"{(header.num_layers, header.num_experts)}")
                yield counts

    return header, steps()
