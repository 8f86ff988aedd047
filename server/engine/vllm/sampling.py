"""Requests and outputs between our types and vLLM's: sampling parameters, structured output,
logprobs, finish reasons, and the per-request state of a stream of vLLM deltas.

What vLLM cannot do raises `SamplingParamsError(param, "... not supported by the vllm engine")`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from server.engine.request import EngineRequest, Logprob, SamplingParams, SamplingParamsError
from server.engine.stats import RoutingStats
from server.engine.vllm.args import NOT_SUPPORTED

FINISH_REASONS = ("stop", "length", "abort", "error")


def to_vllm_sampling_kwargs(params: SamplingParams, max_tokens: int, return_routing: bool = False) -> dict[str, Any]:
    """Keyword arguments for vLLM's `SamplingParams` (output kind added by the caller)."""
    if return_routing:
        raise SamplingParamsError("return_routing", f"return_routing: per-token expert ids are {NOT_SUPPORTED}")
    if params.n > 1 and params.greedy:
        raise SamplingParamsError("n", f"n: n > 1 with greedy sampling (temperature 0) is {NOT_SUPPORTED}; "
                                       f"use a temperature > 0")
    return dict(
        n=params.n, temperature=params.temperature, top_p=params.top_p,
        top_k=0 if params.top_k in (0, -1) else params.top_k, min_p=params.min_p, seed=params.seed,
        max_tokens=max_tokens, min_tokens=params.min_tokens, stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias) if params.logit_bias else None,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
    )


def to_vllm_structured(structured: Any) -> dict[str, Any] | None:
    """Keyword arguments for vLLM's `StructuredOutputsParams` from our compiled request (only its
    spec is used: vLLM compiles for itself; ours compiled on the API side for the 400s). A
    reasoning part is skipped by vLLM's own reasoning parser (`--reasoning-parser` is passed on)."""
    if structured is None:
        return None
    spec = structured.spec
    kw: dict[str, Any] = {"disable_any_whitespace": not spec.any_whitespace}
    if spec.kind == "json":
        kw["json"] = json.loads(spec.value)
    elif spec.kind == "json_object":
        kw["json_object"] = True
    elif spec.kind == "choice":
        kw["choice"] = spec.choices()
    else:  # regex, grammar
        kw[spec.kind] = spec.value
    return kw


def to_logprob(token_id: int, position: Any, k: int) -> Logprob:
    """vLLM's {token_id: Logprob(logprob, rank)} for one position -> ours (top-k best first)."""
    position = position or {}
    chosen = position.get(token_id)
    lp = float(chosen.logprob) if chosen is not None else -math.inf
    top = [(int(t), float(x.logprob)) for t, x in position.items() if x.rank is not None and x.rank <= k]
    top.sort(key=lambda p: -p[1])
    return Logprob(int(token_id), lp, top[:k])


def finish_reason(reason: Any) -> str | None:
    if reason is None:
        return None
    r = str(reason).lower()  # vLLM's FinishReason is an IntEnum whose str() is the name
    if r in FINISH_REASONS:
        return r
    return "stop" if r == "repetition" else "error"


class StreamState:
    __slots__ = ("device_tokens", "expert_counts", "first_token_time", "num_generated", "prompt_logprobs",
                 "request", "sent_prompt_info")

    def __init__(self, request: EngineRequest):
        self.request = request
        self.prompt_logprobs: list[Logprob | None] | None = None
        self.sent_prompt_info = False
        self.num_generated = 0
        self.first_token_time: float | None = None
        # MoE usage (only with vLLM's routed experts): [layer][expert] assignments, per device
        self.expert_counts: list[list[int]] | None = None
        self.device_tokens: dict[str, int] | None = None

    def add_routing(self, routing: RoutingStats) -> None:
        if self.expert_counts is None:
            self.expert_counts = [list(row) for row in routing.expert_tokens]
            self.device_tokens = dict(routing.device_tokens)
            return
        self.expert_counts = [[a + b for a, b in zip(r1, r2, strict=True)]
                              for r1, r2 in zip(self.expert_counts, routing.expert_tokens, strict=True)]
        for dev, n in routing.device_tokens.items():
            self.device_tokens[dev] = self.device_tokens.get(dev, 0) + n  # type: ignore[index]
