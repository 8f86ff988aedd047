"""VLLMEngine: the `EngineClient` protocol on vLLM's v1 `AsyncLLM`.

vLLM is imported lazily (inside the methods), so this module imports without it.

- Requests map onto vLLM's one to one (server/engine/vllm/sampling.py); outputs use vLLM's
  DELTA kind, so each vLLM `RequestOutput` becomes one of ours.
- Config: server/engine/vllm/args.py. Metrics: the stats bridge (server/engine/vllm/stats.py).
- Routing: vLLM on CPU cannot return routed experts, so `routing` is always None there. On GPU
  vLLM 0.32 can (`enable_return_routed_experts`, Model Runner V2 only); when it is turned on
  through `MOE_SERVE_VLLM_ARGS`, each finished request's expert ids are counted into
  `RoutingStats` (prompt + generated tokens, delivered when the request finishes).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.config import EngineConfig
from server.engine.admission import InFlight
from server.engine.protocol import EngineDeadError, EngineOverloadedError, ModelInfo
from server.engine.request import (
    CompletionOutput,
    EngineRequest,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    SamplingParamsError,
)
from server.engine.stats import PlacementInfo, StatLogger
from server.engine.validate import validate_request
from server.engine.vllm.args import (
    check_arg_names,
    engine_args_kwargs,
    multi_node_defaults,
    num_experts,
    num_moe_layers,
    top_k,
)
from server.engine.vllm.sampling import (
    StreamState,
    finish_reason,
    to_logprob,
    to_vllm_sampling_kwargs,
    to_vllm_structured,
)
from server.engine.vllm.stats import StatsBridge, make_bridge_class, routing_from_experts

log = logging.getLogger(__name__)


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
        check_arg_names(kwargs, AsyncEngineArgs)
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
            num_layers=int(getattr(hf, "num_hidden_layers", 0) or 0), num_experts=int(num_experts(mc)),
            top_k=int(top_k(mc)), dtype=str(mc.dtype).replace("torch.", ""), device=self.device,
            num_moe_layers=num_moe_layers(mc),
            # vLLM's --kv-cache-dtype: auto stores the model dtype, bfloat16 bfloat16, fp8 / fp8_e4m3 float8_e4m3fn
            kv_cache_dtype={"auto": str(mc.dtype).replace("torch.", ""), "bfloat16": "bfloat16"}.get(
                config.kv_cache_dtype, "float8_e4m3fn"))
        self.in_flight = InFlight(config.max_num_seqs, config.max_queue_len)  # request id -> its n
        self._loggers: list[StatLogger] = []
        self._bridge = StatsBridge(self._loggers, lambda rid: self.in_flight.get(rid, 1))
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
        self._engine = AsyncLLM.from_vllm_config(self.vllm_config, stat_loggers=[make_bridge_class(self._bridge)],
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
        self.in_flight.admit(rid, request.sampling_params.n)  # or 429
        params = request.sampling_params
        state = StreamState(request)
        inner = self._engine.generate(tokens_input(list(request.prompt_token_ids)), vparams, rid,
                                      priority=request.priority, trace_headers=request.trace_headers)
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
            self.in_flight.release(rid)
            if not finished:  # the consumer went away (disconnect, timeout) or an error: free vLLM's blocks
                try:
                    await inner.aclose()
                    if self._engine is not None:
                        await self._engine.abort(rid)
                except Exception:
                    log.exception("aborting %s in vLLM failed", rid)

    def _convert(self, vout: Any, state: StreamState, params: SamplingParams) -> RequestOutput | None:
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
            if self.routing_enabled and len(self.in_flight) <= 1:
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
        return len(self.in_flight)
