"""Build the engine a config asks for (native by default; vLLM imported only when asked)."""

from __future__ import annotations

import json
import logging
import os

import torch

from server.config import EngineConfig
from server.engine.protocol import EngineClient, ModelInfo

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 512 * 2**20
MAX_DEFAULT_MODEL_LEN = 8192
DEFAULT_BATCHED_TOKENS = 2048  # per step, with chunked prefill


def eos_token_ids(model_path: str, model_cfg, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json, config.json and the tokenizer, as vLLM collects them."""
    ids: list[int] = list(model_cfg.eos_token_ids)
    gen = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


def state_bytes(config: EngineConfig, model) -> int:
    """What a hybrid model's state slots take: one per sequence the engine runs at once, plus
    the runner's scratch row (0 for models without linear-attention layers)."""
    if not model.config.hybrid:
        return 0
    return (config.max_num_seqs + 1) * model.state_bytes_per_sequence()


def num_kv_blocks(config: EngineConfig, model, draft: tuple[int, int] = (0, 0)) -> int:
    """KV blocks from the cache budget (`--kv-cache-memory`), after a hybrid model's state slots
    (the same budget holds both). `draft`: a speculative proposer's own KV (spec/engine.py
    `draft_kv_bytes`: bytes per target block, fixed bytes), inside the same budget: every block
    counts the target's and the drafter's bytes, so the budget splits between them in the ratio
    of their per-token KV sizes."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    draft_per_block, draft_fixed = draft
    per_block = model.kv_bytes_per_block(config.block_size) + draft_per_block
    budget = config.kv_cache_memory
    if budget is None:
        dev = model.embed.weight.device
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget = int(free * 0.4)
        else:
            budget = DEFAULT_CPU_KV_BYTES
    states = state_bytes(config, model)
    if draft_fixed + per_block > budget:
        raise ValueError(f"the cache budget ({budget / 2**20:.1f} MiB) cannot hold a KV block of the target and "
                         f"the speculative drafter's KV ({(draft_fixed + per_block) / 2**20:.1f} MiB): raise "
                         f"--kv-cache-memory")
    states += draft_fixed
    if states and states + per_block > budget:
        raise ValueError(f"the cache budget ({budget / 2**20:.1f} MiB) cannot hold the recurrent state of "
                         f"--max-num-seqs {config.max_num_seqs} sequences ({states / 2**20:.1f} MiB) and a KV "
                         f"block: raise --kv-cache-memory or lower --max-num-seqs")
    return max(1, (budget - states) // per_block)


def physical_cores() -> int:
    """Physical cores this process may run on (logical CPUs over SMT siblings)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
        smt = sum(len(range(int(a), int(b) + 1)) if "-" in part else 1
                  for part in text.split(",") for a, _, b in [part.partition("-")])
    except (OSError, ValueError):
        smt = 1
    return max(1, logical // max(1, smt))


# a server keeps one core free of compute threads only where it has more than this many
SERVER_RESERVE_ABOVE_CORES = 2


def server_reserved_cores(cores: int) -> int:
    """Cores a server leaves free of compute threads: one on machines with more than two
    physical cores (as vLLM's CPU backend reserves one), none on one or two. The server's other
    threads (event loop, tokenizer) are idle most of the time (unlike vLLM's busy-polling engine
    core process), and on two cores a reserved core halves the compute. The measurements behind
    this: docs/benchmarks.md, section "Compute threads of a server"."""
    return 1 if cores > SERVER_RESERVE_ABOVE_CORES else 0


def configure_cpu_threads(reserve: int | None = None) -> int:
    """The CPU engine's compute threads: physical cores - `reserve` (None: a server's default,
    `server_reserved_cores`). The offline `LLM` has no other busy thread (its engine loop is the
    compute thread) and reserves none. OMP_NUM_THREADS, when set, wins; so does a thread count
    the caller set."""
    cores = physical_cores()
    if os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() != cores:
        return torch.get_num_threads()
    if reserve is None:
        reserve = server_reserved_cores(cores)
    threads = max(1, cores - reserve)
    torch.set_num_threads(threads)
    log.info("CPU engine: %d compute thread(s) on %d core(s) (OMP_NUM_THREADS overrides)", threads, cores)
    return threads


def build_native_core(config: EngineConfig, progress: bool = True, reserve_cpu_cores: int | None = None):
    """(EngineCore, ModelInfo) for the native engine; `reserve_cpu_cores`: cores left free of
    compute threads on a CPU engine (None: a server's default, `server_reserved_cores`; 0 offline)."""
    from models import load_model
    from models.kv_cache_dtype import configure_kv_cache, kv_cache_dtype_name
    from models.gguf_loader import load_tokenizer
    from server.engine.native.placement.manager import placement_from_config
    from server.engine.native.placement.trace import RoutingRecorder
    from server.engine.native.core import EngineCore

    if config.speculative is not None:  # a method without a proposer fails before the model loads
        from server.engine.native.spec.engine import check_method

        check_method(config.speculative)
    torch.manual_seed(config.seed)
    spec = config.speculative
    model = load_model(config.model, dtype=config.dtype, device=config.device, progress=progress,
                       kernels=config.kernel_flags, quantization=config.quantization,
                       mtp=spec is not None and spec.method == "mtp",
                       bf16_weights=not config.places_experts)  # placement moves float expert stacks
    # a quantized checkpoint's experts (and --quantization fp8's) are placed as QTensor stacks;
    # --quantization int8/int4's are held for the CPU experts kernel only
    if model.quantized and config.places_experts:
        raise ValueError(f"--quantization {config.quantization} keeps the experts only quantized, for the CPU "
                         "experts kernel: expert placement (--expert-devices, --num-redundant-experts, "
                         "--gpu-expert-budget, --rebalance-interval) cannot move them")
    if model.embed.weight.device.type == "cpu":
        configure_cpu_threads(reserve_cpu_cores)
    # AutoTokenizer of --tokenizer or the model; a GGUF file's: built from its metadata
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    cfg = model.config
    kv_dtype = configure_kv_cache(model, config.kv_cache_dtype, config.model)  # before the blocks are counted
    draft_kv = (0, 0)
    if spec is not None:
        from server.engine.native.spec.engine import draft_kv_bytes

        draft_kv = draft_kv_bytes(spec, model, config.block_size, config.max_num_seqs)
    blocks = num_kv_blocks(config, model, draft_kv)
    max_len = config.max_model_len or min(cfg.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    if config.max_model_len and config.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    if max_len > blocks * config.block_size:
        if config.max_model_len:
            raise ValueError(f"--max-model-len {max_len} does not fit the KV cache "
                             f"({blocks} blocks of {config.block_size} tokens); raise --kv-cache-memory")
        max_len = blocks * config.block_size
    budget = config.max_num_batched_tokens
    if budget is None:  # without chunked prefill a whole prompt must fit one step
        budget = DEFAULT_BATCHED_TOKENS if config.enable_chunked_prefill else max(max_len, DEFAULT_BATCHED_TOKENS)
    for block in model.moe_blocks():
        block.capacity_factor = config.expert_capacity_factor
    # expert placement / rebalancing / routing traces, when asked (the core reports routing to
    # the manager after each step); then the plan as the engine runs it: CUDA graphs or not
    placement = placement_from_config(model, config)
    model.apply_plan(model.kernel_plan.for_engine(
        placed=placement is not None and placement.executor is not None,
        host_tier=placement is not None and placement.computes_on_host,
        several_gpus=placement is not None and placement.several_gpus,
        capacity_limited=config.expert_capacity_factor is not None, enforce_eager=config.enforce_eager))
    async_scheduling = resolve_async_scheduling(config, placement is not None)
    core = EngineCore(
        model, tokenizer, num_blocks=blocks, block_size=config.block_size, max_model_len=max_len,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
        enable_prefix_caching=config.enable_prefix_caching, enable_chunked_prefill=config.enable_chunked_prefill,
        scheduling_policy=config.scheduling_policy, seed=config.seed,
        eos_token_ids=eos_token_ids(config.model, cfg, tokenizer), placement=placement,
        routing_listeners=(RoutingRecorder.for_model(config.record_routing, model),) if config.record_routing else (),
        speculative=config.speculative, kernels=config.kernel_flags, async_scheduling=async_scheduling,
    )
    dtype = str(model.embed.weight.dtype).replace("torch.", "")
    info = ModelInfo(
        name=config.model_name, path=config.model, max_model_len=core.max_model_len, vocab_size=cfg.vocab_size,
        architecture=cfg.architecture, num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=cfg.top_k,
        dtype=dtype, device=str(model.embed.weight.device), num_moe_layers=cfg.num_moe_layers,
        eos_token_ids=core.eos_token_ids, kernel_plan=model.kernel_plan.to_dict(),
        async_scheduling=core.async_step is not None, kv_cache_dtype=kv_cache_dtype_name(kv_dtype),
        kv_cache={"blocks": blocks, "block_size": config.block_size,
                  "target_bytes": blocks * model.kv_bytes_per_block(config.block_size),
                  "draft_bytes": blocks * draft_kv[0] + draft_kv[1]},
    )
    log.info("loaded %s (%s, %s on %s) in %.1fs; KV cache %d blocks x %d tokens (%s, %.1f MiB); max_model_len %d",
             config.model, cfg.architecture, dtype, info.device, model.load_seconds, blocks, config.block_size,
             info.kv_cache_dtype, info.kv_cache["target_bytes"] / 2**20, core.max_model_len)
    if spec is not None and spec.method != "ngram":
        log.info("speculative drafter (%s) KV cache: %.1f MiB, inside the same budget (%d blocks of its own)",
                 spec.method, info.kv_cache["draft_bytes"] / 2**20,
                 (blocks * draft_kv[0] + draft_kv[1]) // max(draft_kv[0], 1))
    log.info("async scheduling: %s", "on" if info.async_scheduling else "off")
    if cfg.hybrid:
        log.info("recurrent state: %d slots x %.2f MiB per sequence (%d linear-attention / Mamba2 layers)",
                 config.max_num_seqs + 1, model.state_bytes_per_sequence() / 2**20,
                 sum(k != "attention" for k in cfg.layer_kinds))
    return core, info


def resolve_async_scheduling(config: EngineConfig, placed: bool) -> bool:
    """Whether the native engine schedules asynchronously: the one place that decides it.
    Off with expert placement (a rebalance moves experts between steps, with the device idle) and
    with speculative decoding, as vLLM did at first: a step's accepted tokens decide the next
    step's inputs (and drafts) on the host."""
    if not config.async_scheduling:
        return False
    if config.speculative is not None:
        log.info("async scheduling is off: speculative decoding (--speculative-config) decides each step's "
                 "inputs from the last one's accepted tokens on the host")
        return False
    if placed:
        log.info("async scheduling is off: expert placement rebalances experts between steps")
        return False
    return True


def build_engine(config: EngineConfig) -> EngineClient:
    if config.engine == "vllm":
        from server.engine.vllm import VLLMEngine

        return VLLMEngine(config)
    from server.engine.native.async_engine import AsyncEngine

    core, info = build_native_core(config)
    return AsyncEngine(core, info, max_queue_len=config.max_queue_len, max_num_seqs=config.max_num_seqs,
                       progress_timeout=config.engine_progress_timeout)
