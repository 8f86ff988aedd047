"""Requests, sampling parameters and outputs shared by every engine.

`SamplingParams` validates itself when built (`SamplingParamsError` names the parameter);
`SamplingParams.verify_vocab(vocab_size)` checks the token-id fields once the engine knows
its vocabulary. Outputs are *deltas*: each `RequestOutput` carries only the tokens and text
produced since the previous one for that request; the last one has `finished=True`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20
# Per-request bounds on what each engine step pays for (documented in the README):
MAX_N = 128  # completions per request (the engine also caps n at --max-num-seqs)
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
# return_routing: most expert ids one request may return, (prompt + n * max_tokens) tokens x
# MoE layers x top-k (each id is ~3 bytes of JSON plus its weight; 2**20 ids is ~10 MB)
MAX_ROUTING_IDS = 1 << 20


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names it (the API turns this into a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    if isinstance(x, int):
        return abs(x) < 2**53  # huge ints: out of every range here, and float() would overflow
    return math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0..20)
    prompt_logprobs: int | None = None  # number of top logprobs per prompt token (0..20)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # derived once from stop_token_ids (membership is tested for every generated token)
    stop_token_set: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise SamplingParamsError("stop", "stop: must be a string or a list of strings")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingParamsError("stop_token_ids", "stop_token_ids: must be a list of integers")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        self.stop_token_set = frozenset(self.stop_token_ids)

    # -- validation ---------------------------------------------------------------------
    def _validate(self) -> None:
        def bad(param: str, msg: str) -> None:
            raise SamplingParamsError(param, f"{param}: {msg}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}]")
        if not _is_num(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            bad("temperature", "must be a number in [0, 2]")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            bad("seed", "must be an integer within int64")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if len(self.stop) > MAX_STOP:
            bad("stop", f"at most {MAX_STOP} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", "stop strings must be non-empty strings")
            if len(s) > MAX_STOP_CHARS:
                bad("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                bad("stop_token_ids", "must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                bad(name, "must be a number in [-2, 2]")
        if not _is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", "must be a number in (0, 2]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be an object mapping token ids to numbers")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
            bad_keys = [k for k in self.logit_bias if not _is_int(k) or k < 0]
            if bad_keys:
                bad("logit_bias", f"keys must be non-negative integer token ids; bad: {short_list(bad_keys)}")
            bad_vals = [k for k, v in self.logit_bias.items() if not _is_num(v) or not -100 <= v <= 100]
            if bad_vals:
                bad("logit_bias", f"values must be numbers in [-100, 100]; bad at keys: {short_list(bad_vals)}")

    def verify_vocab(self, vocab_size: int) -> None:
        """Check token-id fields against the model's vocabulary (all bad ids named together)."""
        bad_stop = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad_stop:
            raise SamplingParamsError(
                "stop_token_ids", f"stop_token_ids: ids outside the vocabulary (size {vocab_size}): {short_list(bad_stop)}"
            )
        if self.logit_bias:
            bad_keys = [k for k in self.logit_bias if k >= vocab_size]
            if bad_keys:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias: token ids outside the vocabulary (size {vocab_size}): {short_list(bad_keys)}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def short_list(items: list[Any], limit: int = 8) -> str:
    """The first `limit` items, then how many there are in all."""
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first when the scheduler's policy is "priority"
    return_routing: bool = False  # per-token expert ids in the outputs
    # structured output: a server.engine.structured.backend.CompiledStructure (its `spec` says what
    # was asked, its `grammar` is compiled already: engines never compile), or None
    structured: Any | None = None
    # W3C trace context (traceparent, tracestate) of the request's span when tracing is on
    # (server/api/tracing.py); engines that trace themselves (vLLM) parent their spans with it
    trace_headers: dict[str, str] | None = None


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str = ""  # delta since the previous output
    token_ids: list[int] = field(default_factory=list)  # delta
    logprobs: list[Logprob] | None = None  # delta, one per token in token_ids
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or token id that matched
    # when the request asked for routing: expert ids and router weights of the new tokens,
    # [num_new_tokens, num_moe_layers, top_k], as compact tensors (uint8/int16 ids, float16
    # weights) or nested lists; the API renders them with `.tolist()`
    routing: Any | None = None
    routing_weights: Any | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionOutput) -> None:
        """Append a streamed delta of the same completion (text, tokens, logprobs, routing)."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.routing = concat_rows(self.routing, delta.routing)
        self.routing_weights = concat_rows(self.routing_weights, delta.routing_weights)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


class RowChunks(list):
    """Per-token rows (routing ids or weights) accumulated from several deltas: the deltas'
    chunks in order (compact tensors or nested lists), concatenated only when rendered."""


def concat_rows(acc: Any, new: Any) -> Any:
    """`acc` followed by the rows of `new` (either may be None, a chunk or RowChunks)."""
    if new is None:
        return acc
    if acc is None:
        return RowChunks(new) if isinstance(new, RowChunks) else new
    if not isinstance(acc, RowChunks):
        acc = RowChunks([acc])
    acc.extend(new if isinstance(new, RowChunks) else [new])
    return acc


@dataclass
class RequestMetrics:
    arrival_time: float
    queued_time: float | None = None  # seconds from arrival to first scheduled
    first_token_time: float | None = None  # monotonic
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    # MoE usage (engines that observe routing): token-expert assignments per [moe_layer][expert]
    # over every token the request ran through the model, and how many were computed per device
    expert_counts: list[list[int]] | None = None
    device_expert_tokens: dict[str, int] | None = None
    num_dropped_assignments: int | None = None  # over expert capacity (None: no capacity limit)
    # to zero-computation experts (LongCat; None: the model has none), counted apart from expert_counts
    num_zero_expert_assignments: int | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_token_ids: list[int] | None = None  # set on the first output
    # per prompt token (first is None), when prompt_logprobs was asked; set on the first output
    prompt_logprobs: list[Logprob | None] | None = None
    # as CompletionOutput.routing, per prompt token; first output only, when routing was asked
    prompt_routing: Any | None = None
    prompt_routing_weights: Any | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request

    def add(self, delta: RequestOutput) -> None:
        """Merge the next streamed delta of this request into this accumulated output.

        Completions are matched by index (new ones are added, `outputs` stays sorted by index);
        the prompt fields come from the first output that has them; the latest metrics win.
        """
        by_index = {o.index: o for o in self.outputs}
        for d in delta.outputs:
            acc = by_index.get(d.index)
            if acc is None:
                acc = by_index[d.index] = CompletionOutput(index=d.index)
                self.outputs.append(acc)
            acc.add(d)
        self.outputs.sort(key=lambda o: o.index)
        for name in ("prompt_token_ids", "prompt_logprobs", "prompt_routing", "prompt_routing_weights"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(delta, name))
        if delta.metrics is not None:
            self.metrics = delta.metrics
        self.finished = self.finished or delta.finished
        self.error = self.error or delta.error
