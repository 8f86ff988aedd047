"""Statistics the engines emit; the metrics package turns them into Prometheus series.

An engine calls every registered `StatLogger.record(...)` once per step, from its own
thread (loggers must be thread-safe and cheap). Nothing here is per-request in labels:
routing counts are per (layer, logical expert) and per device only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class IterationStats:
    """One engine step."""

    timestamp: float  # monotonic
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_batched_tokens: int = 0
    num_prompt_tokens: int = 0  # prompt tokens computed this step
    num_generation_tokens: int = 0  # tokens sampled this step
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    step_time: float = 0.0  # seconds
    # (request_id-free) first-token latencies and inter-token latencies observed this step
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    # speculative decoding (native engine): sequences verified with drafts this step, their
    # drafted and accepted tokens, and the accepted count per draft position (index = position)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    # a step with no prefill tokens: "verify" (some sequence verified drafts) or "decode"
    # (plain one-token decodes), and the distinct experts its tokens touched per MoE layer
    decode_step_kind: str | None = None
    distinct_experts: list[int] | None = None


@dataclass
class FinishedRequestStats:
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    e2e_latency: float
    queued_time: float
    prefill_time: float
    decode_time: float
    inference_time: float
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens_param: int | None = None
    n_param: int = 1


@dataclass
class RoutingStats:
    """Tokens routed this step, per (layer, logical expert), and per device."""

    num_layers: int
    num_experts: int
    # [num_layers][num_experts] token-expert assignments this step
    expert_tokens: list[list[int]]
    device_tokens: dict[str, int] = field(default_factory=dict)
    # [num_layers] assignments dropped over expert capacity this step (None: no capacity limit)
    dropped_tokens: list[int] | None = None
    # [num_layers] assignments to zero-computation experts this step (LongCat; None: the model has
    # none): their own kind, in neither expert_tokens nor device_tokens
    zero_expert_tokens: list[int] | None = None
    # [num_tokens, num_layers, top_k] the step's expert ids, a tensor (native engine; None elsewhere)
    expert_ids: Any = None


class RoutingListener(Protocol):
    """Hears every engine step's routing, on the engine thread between steps (expert placement,
    routing traces); closed with the engine."""

    def on_routing(self, stats: RoutingStats) -> None: ...

    def close(self) -> None: ...


@dataclass
class PlacementInfo:
    """Where each logical expert lives: rows of (layer, expert, device, replica)."""

    rows: list[tuple[int, int, str, int]] = field(default_factory=list)
    # the CPU expert tier, where there is one: {"format", "bytes", "in_place"} (PlacementManager.tier_info)
    cpu_tier: dict | None = None


class StatLogger(Protocol):
    def record(
        self,
        iteration: IterationStats,
        finished: list[FinishedRequestStats],
        routing: RoutingStats | None,
    ) -> None: ...
