"""The engine protocol: what the API layer may use of an engine, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from collections.abc import AsyncIterator, Callable

from server.engine.admission import InFlight
from server.engine.errors import EngineDeadError, EngineOverloadedError, RequestTooLongError
from server.engine.request import EngineRequest, RequestOutput
from server.engine.stats import PlacementInfo, StatLogger

__all__ = ["EngineClient", "EngineDeadError", "EngineOverloadedError", "ModelInfo", "RequestTooLongError"]


@dataclass(frozen=True)
class ModelInfo:
    name: str  # served model name
    path: str
    max_model_len: int
    vocab_size: int
    architecture: str
    num_layers: int
    num_experts: int
    top_k: int
    dtype: str
    device: str
    num_moe_layers: int | None = None  # layers with an MoE block (routing series are per MoE layer)
    eos_token_ids: tuple[int, ...] = ()  # what ends a sequence (structured outputs stop on these)
    kernel_plan: dict | None = None  # the native engine's kernels per layer (KernelPlan.to_dict)
    async_scheduling: bool = False  # the engine schedules one step ahead of the device (--async-scheduling)
    kv_cache_dtype: str | None = None  # what the paged KV cache stores (--kv-cache-dtype): bfloat16, float8_e4m3fn ...
    # the native engine's KV cache: blocks, block_size, target_bytes and draft_bytes (a speculative
    # drafter's own KV: MTP layers, an EAGLE-3 head, a draft model; inside --kv-cache-memory)
    kv_cache: dict | None = None


@runtime_checkable
class EngineClient(Protocol):
    model_info: ModelInfo
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    in_flight: InFlight  # the requests it holds: admission (429) decided there, for both engines

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its output deltas; raises SamplingParamsError,
        RequestTooLongError or EngineOverloadedError (from `in_flight.admit`) before the first
        output."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine cannot serve."""
        ...

    def add_stat_logger(self, logger: StatLogger) -> None: ...

    def placement(self) -> PlacementInfo | None: ...

    def add_placement_listener(self, callback: Callable[[PlacementInfo], None]) -> None:
        """Call `callback` with the new placement whenever experts move (rebalancing)."""
        ...

    def num_unfinished_requests(self) -> int:
        """len(in_flight)."""
        ...
