"""Configuration: frozen dataclasses validated when built, one source of defaults and flags.

Each field with `help` in its metadata is a `moe-serve` flag (server/cli.py generates them: name
`--<field-with-dashes>`, type from the annotation, choices from a `Literal`, default from the
field), an environment variable (`MOE_SERVE_<FIELD>`) and, through the chart, a Helm value.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from models.dtypes import DTYPE_ALIASES, DTYPES
from models.kernels.flags import (
    AttentionChoice,
    CpuKernelsChoice,
    FusedOpsChoice,
    KernelFlags,
    LinearChoice,
    MoEChoice,
)
from server.engine.structured.limits import GrammarLimits

BUNDLED_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "tiny-mixtral")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# vLLM's names; server/api/tool_parsers and server/api/reasoning hold the implementations
ToolCallParser = Literal["hermes", "mistral", "llama3_json", "deepseek_v3", "openai", "glm45", "kimi_k2",
                         "qwen3_coder", "minimax_m2", "llama4_pythonic"]
ReasoningParser = Literal["deepseek_r1", "qwen3", "openai_gptoss"]
TOOL_CALL_PARSERS: tuple[str, ...] = get_args(ToolCallParser)
REASONING_PARSERS: tuple[str, ...] = get_args(ReasoningParser)
EngineName = Literal["native", "vllm"]
Dtype = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"]
# models.kernels.quant.FORMATS (CPU C kernels), and fp8 (models/quant/weights.py: any device)
Quantization = Literal["int8", "int8_channel", "int4", "int4_zp", "fp8"]
KVCacheDtype = Literal["auto", "bfloat16", "fp8", "fp8_e4m3"]  # models.kv_cache_dtype.KV_CACHE_DTYPES (vLLM's names)
SchedulingPolicy = Literal["fcfs", "priority"]
ExpertPlacement = Literal["contiguous", "round_robin", "balanced"]
CpuExpertFormat = Literal["auto", "float32", "bf16", "int8", "int4"]  # models.placement.executor.TIER_FORMATS
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
assert set(get_args(Dtype)) == {"auto", *DTYPES, *DTYPE_ALIASES}, "models.dtypes and Dtype disagree"

_BYTE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
               "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)(" + "|".join(_BYTE_UNITS) + ")?")


# Bounds of the float options (besides being finite: a NaN passes every comparison, an inf
# overflows the arithmetic that uses it). Durations: past ~116 days a timeout means "never"
# anyway, and every timer still holds it. Expert capacity: past E / top_k nothing is dropped;
# bounded so that ceil(factor * tokens * top_k / experts) stays a 64-bit integer.
MAX_SECONDS = 1e7
MAX_CAPACITY_FACTOR = 1e6


class ConfigError(ValueError):
    pass


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (server/cli.py builds them the same way)."""
    return "--" + field_name.replace("_", "-")


def check_finite(config: Any) -> None:
    """Every float value of a config dataclass is a finite number."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag_name(f.name)} must be a finite number, not {value}")


def check_range(config: Any, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    """`low <= value <= high` (`low < value` with `low_open`) for the option `name`, unless None."""
    value = getattr(config, name)
    if value is None:
        return
    if (value <= low if low_open else value < low) or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{flag_name(name)} must be in {bounds}, not {value:g}")


def check_otlp_endpoint(endpoint: str) -> None:
    """An http(s) URL, and the OpenTelemetry SDK (the `otel` extra) installed to send to it."""
    from importlib.util import find_spec

    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        raise ConfigError(f"--otlp-traces-endpoint must be an http:// or https:// URL, not {endpoint!r}")
    try:
        installed = find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:
        installed = False
    if not installed:
        raise ConfigError("--otlp-traces-endpoint needs the OpenTelemetry SDK: pip install 'moe-serve[otel]'")


def parse_bytes(value: str | int | None, require_unit: bool = False) -> int | None:
    """'2GiB', '512M', '3e9B', '1e9', 1234 -> bytes (ValueError on anything else, negatives
    included). With `require_unit`, a bare number is refused (where a bare number means a
    count, as for --gpu-expert-budget)."""
    if value is None or isinstance(value, int):
        return value
    m = _SIZE.fullmatch(str(value).strip().lower().replace(" ", ""))
    if m is None or (require_unit and m.group(2) is None):
        raise ValueError(f"expected a size like 512MiB or 2GiB, not {value!r}")
    size = float(m.group(1)) * _BYTE_UNITS[m.group(2) or "b"]
    if not math.isfinite(size):  # 1e999
        raise ValueError(f"expected a size like 512MiB or 2GiB, not {value!r}")
    return int(size)


def option(default: Any, help: str, *, kind: str | None = None, shown: str | None = None,
           env_in_help: bool = True) -> Any:
    """A config field that is also a command-line flag: `help` is its --help text, `kind`
    'bytes' parses sizes like 2GiB, `shown` replaces the default in --help, `env_in_help` False
    leaves the env var and the default out of it (secrets)."""
    meta = {"help": help, "kind": kind, "shown": shown, "env_in_help": env_in_help}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EngineConfig:
    model: str = option(BUNDLED_MODEL, "model directory (HF layout) or GGUF file; default: the bundled tiny checkpoint",
                        shown="bundled tiny-mixtral")
    served_model_name: str | None = option(None, "model name in the API (default: directory name)")
    tokenizer: str | None = option(None, "tokenizer directory (default: the model's; a GGUF file's from its metadata)")
    engine: EngineName = option("native", "inference engine")
    dtype: Dtype = option("auto", "weight dtype")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    # default: the model's max_position_embeddings (capped)
    max_model_len: int | None = option(None, "context length (prompt + completion)")
    max_num_seqs: int = option(64, "most sequences per batch")
    # tokens per engine step; None: 2048 with chunked prefill, else max_model_len (a prompt must
    # then fit one step whole)
    max_num_batched_tokens: int | None = option(None, "most tokens per engine step")
    block_size: int = option(16, "KV-cache block size in tokens (power of two)")
    # bytes; default: 512 MiB on CPU, 40% of free on CUDA
    kv_cache_memory: int | None = option(None, "KV-cache size, e.g. 512MiB or 2GiB", kind="bytes")
    # auto: the model dtype; bfloat16: half a float32 cache's bytes (CPU); fp8 / fp8_e4m3:
    # float8_e4m3fn with per-tensor scales (half the bytes of bf16, so twice the blocks for the same
    # --kv-cache-memory; models/kv_cache_dtype.py)
    kv_cache_dtype: KVCacheDtype = option(
        "auto", "KV-cache storage: auto (the model dtype), bfloat16, or fp8 / fp8_e4m3 (float8 e4m3 with "
        "per-tensor scales)")
    # overrides kv_cache_memory (tests)
    num_kv_blocks: int | None = option(None, "number of KV blocks (overrides --kv-cache-memory)")
    enable_prefix_caching: bool = option(True, "reuse KV blocks of shared prefixes")
    enable_chunked_prefill: bool = option(True, "split long prefills across steps")
    enforce_eager: bool = option(False, "no CUDA graphs for decode steps (native engine on CUDA)")
    # the host schedules step N+1 and applies step N-1's results while the device computes step N
    # (native engine: server/engine/native/async_step.py; vLLM: its own flag); resolved once, with
    # what turns it off, by server.engine.factory.resolve_async_scheduling
    async_scheduling: bool = option(
        False, "schedule the next step and process the last one's outputs while the device computes (vLLM's name)")
    # kernels (native engine): the kernel plan (models/kernels/plan.py) resolves "auto" at load
    # and refuses a forced choice that cannot serve the model here, saying why
    attention_backend: AttentionChoice = option(
        "auto", "decode attention kernel (auto: Triton on CUDA, the C kernel on a float32 CPU, else reference)")
    moe_backend: MoEChoice = option(
        "auto", "MoE experts kernel (auto: Triton on CUDA, the C kernel on a float32 CPU, else loop)")
    cpu_linear_layout: LinearChoice = option(
        "auto", "packed copies of CPU linear weights (auto: the best layout while the copies stay under 1 GiB)")
    fused_ops: FusedOpsChoice = option("auto", "fused RMSNorm and rotary + KV store (auto: Triton on CUDA, the C ops on a float32 CPU model)")
    cpu_kernels: CpuKernelsChoice = option(
        "auto", "the C kernels' threads (auto: PyTorch's OpenMP pool where possible; off: never build them)")
    # weights quantized at load and kept quantized (native engine; models/kernels/quant.py, models/quant)
    quantization: Quantization | None = option(
        None, "quantize the weights at load and keep them quantized: on the CPU int8 (groups of 32), int8_channel, "
              "int4 (symmetric, groups of 32), int4_zp (groups of 32 with zero points); on any device fp8 (float8_e4m3 "
              "per output channel)")
    scheduling_policy: SchedulingPolicy = option("fcfs", "scheduling policy")
    max_queue_len: int = option(1024, "waiting requests past which the API answers 429")
    seed: int = option(0, "engine seed")
    # expert placement (native engine)
    expert_placement: ExpertPlacement = option("contiguous", "expert placement")
    expert_devices: tuple[str, ...] = option((), "comma-separated devices for experts")
    num_redundant_experts: int = option(0, "extra expert replicas")
    gpu_expert_budget: str | None = option(None, "GPU memory for experts (e.g. 4GiB) or a count")
    # the experts beyond --gpu-expert-budget (the CPU tier) are kept and computed in this format
    cpu_expert_format: CpuExpertFormat = option(
        "auto", "format of the CPU expert tier's experts: auto (bf16 model: bf16 in place, else float32), "
                "float32, bf16 (fp32 math), int8, int4 (groups of 32)")
    rebalance_interval: int = option(0, "steps between placement rebalances (0: never)")
    record_routing: str | None = option(None, "file to record per-step routing to")
    # Switch-style expert capacity: at most ceil(factor * tokens * top_k / experts) assignments
    # per expert per step, the rest dropped (native engine); None: off (exact model outputs)
    expert_capacity_factor: float | None = option(
        None, "Switch-style expert capacity per step (tokens past it are dropped; off when unset)")
    # seconds an engine holding requests may go without computing a token before it is
    # declared unhealthy (/health 503, the process exits); 0: no watchdog
    engine_progress_timeout: float = option(
        300.0, "seconds with requests but no token computed before the engine counts as dead (0: off)")
    # caches written at run time (CPU kernel builds, Triton, torch inductor, Hugging Face, vLLM):
    # subdirectories of this one; None: each tool's default (~/.cache/...)
    cache_dir: str | None = option(
        None, "directory for run-time caches: CPU kernel builds, Triton, torch inductor, Hugging Face (default: ~/.cache)")
    # speculative decoding (server/engine/native/spec/): vLLM's JSON; None: off
    speculative_config: str | None = option(
        None, 'speculative decoding, JSON as vLLM spells it, e.g. {"method": "ngram", "num_speculative_tokens": 4}')
    # vLLM pass-through
    tensor_parallel_size: int = option(1, "vLLM: tensor-parallel size")
    data_parallel_size: int = option(1, "vLLM: data-parallel size")
    enable_expert_parallel: bool = option(False, "vLLM: expert parallelism")
    enable_eplb: bool = option(False, "vLLM: expert-parallel load balancer")
    eplb_config: str | None = option(None, "vLLM: EPLB config (JSON)")
    gpu_memory_utilization: float = option(0.9, "vLLM: fraction of GPU memory")
    # splits `<think>` reasoning from content (API) and starts structured output after it (engines)
    reasoning_parser: ReasoningParser | None = option(
        None, "split <think> reasoning into reasoning_content; structured output starts after it")
    # OpenTelemetry (server/api/tracing.py; the `otel` extra): spans per request, exported over
    # OTLP (gRPC, or HTTP with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf); also handed to vLLM
    otlp_traces_endpoint: str | None = option(
        None, "OTLP endpoint traces go to, e.g. http://otel-collector:4317 (off when unset; needs moe-serve[otel])")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                              f"not {self.reasoning_parser!r}")
        if self.engine not in get_args(EngineName):
            raise ConfigError(f"engine must be 'native' or 'vllm', not {self.engine!r}")
        if self.quantization is not None and self.quantization not in get_args(Quantization):
            raise ConfigError(f"quantization must be one of {', '.join(get_args(Quantization))}, "
                              f"not {self.quantization!r}")
        if self.quantization and self.engine != "native":
            raise ConfigError("--quantization quantizes for the native engine's kernels; vLLM takes "
                              "pre-quantized checkpoints instead")
        if self.kv_cache_dtype not in get_args(KVCacheDtype):
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(get_args(KVCacheDtype))}, "
                              f"not {self.kv_cache_dtype!r}")
        if self.dtype not in get_args(Dtype):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in ("max_num_seqs", "block_size", "max_queue_len", "tensor_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be >= 1")
        if self.block_size & (self.block_size - 1):
            raise ConfigError("block_size must be a power of two")
        if self.scheduling_policy not in get_args(SchedulingPolicy):
            raise ConfigError("scheduling_policy must be fcfs or priority")
        if self.expert_placement not in get_args(ExpertPlacement):
            raise ConfigError("expert_placement must be contiguous, round_robin or balanced")
        if self.cpu_expert_format not in get_args(CpuExpertFormat):
            raise ConfigError(f"cpu_expert_format must be one of {', '.join(get_args(CpuExpertFormat))}, "
                              f"not {self.cpu_expert_format!r}")
        if self.num_redundant_experts < 0 or self.rebalance_interval < 0:
            raise ConfigError("num_redundant_experts and rebalance_interval must be >= 0")
        check_range(self, "gpu_memory_utilization", 0.0, 1.0, low_open=True)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be > 0 bytes")
        check_range(self, "expert_capacity_factor", 0.0, MAX_CAPACITY_FACTOR, low_open=True)
        check_range(self, "engine_progress_timeout", 0.0, MAX_SECONDS)  # 0: off
        try:
            self.speculative  # noqa: B018 - validates --speculative-config
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.otlp_traces_endpoint:  # "" (an empty env var or Helm value): off
            check_otlp_endpoint(self.otlp_traces_endpoint)
        try:
            self.kernel_flags  # noqa: B018 - validates the kernel flags
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def cache_environment(self) -> dict[str, str]:
        """The environment variables that send every run-time cache under `cache_dir` ({} when unset).
        Set before torch, Triton or vLLM read them (server.cli does, at startup)."""
        if not self.cache_dir:
            return {}
        root = os.path.abspath(self.cache_dir)
        return {"MOE_SERVE_CACHE_DIR": root,  # models.kernels.cpu_build: <root>/kernels
                "TRITON_CACHE_DIR": os.path.join(root, "triton"),
                "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),
                "HF_HOME": os.path.join(root, "huggingface"),
                "VLLM_CACHE_ROOT": os.path.join(root, "vllm"),
                "XDG_CACHE_HOME": root}

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    @property
    def kernel_flags(self) -> KernelFlags:
        return KernelFlags(attention=self.attention_backend, moe=self.moe_backend, cpu_linear=self.cpu_linear_layout,
                           fused_ops=self.fused_ops, cpu_kernels=self.cpu_kernels)

    @property
    def speculative(self):
        """The parsed --speculative-config (a SpeculativeConfig), None when off."""
        from server.engine.native.spec.config import SpeculativeConfig

        return SpeculativeConfig.parse(self.speculative_config)

    @property
    def places_experts(self) -> bool:
        """Experts placed across devices / replicated / rebalanced (native engine)."""
        return bool(self.expert_devices or self.num_redundant_experts or self.gpu_expert_budget
                    or self.rebalance_interval)

    @property
    def placement_requested(self) -> bool:
        """A placement manager is needed: experts placed, or routing traces recorded."""
        return self.places_experts or bool(self.record_routing)


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "port to bind (0: any free port)")
    api_key: str | None = option(None, "require 'Authorization: Bearer <key>' (env MOE_SERVE_API_KEY)",
                                 env_in_help=False)
    auth_exempt_paths: tuple[str, ...] = option(("/health", "/ready", "/metrics", "/version"),
                                                "comma-separated paths open without a key")
    request_timeout: float = option(600.0, "seconds a request may take before 504")
    drain_timeout: float = option(30.0, "seconds in-flight requests get after SIGTERM")
    max_body_bytes: int = option(4 * 2**20, "largest request body (413 past it), e.g. 4MiB", kind="bytes")
    # request line + headers; past it uvicorn answers 400
    max_header_bytes: int = option(64 * 2**10, "largest request head (400 past it)", kind="bytes")
    # /metrics needs the API key too (it shows per-expert routing counts); off by default so
    # that Prometheus scrapes without a secret, as /health and /ready probes do
    metrics_require_auth: bool = option(False, "/metrics needs the API key too")
    # Host header allow-list (DNS-rebinding protection); empty: the loopback names when bound
    # to a loopback address, any host otherwise. Entries are host names without port; "*": any
    allowed_hosts: tuple[str, ...] = option(
        (), "Host header allow-list, comma-separated (default: loopback names when bound to loopback, else any)")
    limit_concurrency: int | None = option(2048, "open connections/tasks before 503")  # uvicorn answers 503
    body_read_timeout: float = option(30.0, "seconds to receive a request body (408 past it)")
    # tool calling: the parser of the model's own tool-call format (tool_choice "auto")
    tool_call_parser: ToolCallParser | None = option(None, "parser of the model's tool-call format (tool_choice auto)")
    # vLLM's flag; accepted, needs tool_call_parser
    enable_auto_tool_choice: bool = option(False, "vLLM compatibility: needs --tool-call-parser")
    chat_template: str | None = option(
        None, "chat template (Jinja text or a file) instead of the tokenizer's")
    # vLLM now sends the reasoning as `reasoning` only; this also sends its older name
    legacy_reasoning_content: bool = option(
        False, "also send the reasoning as reasoning_content (the older name) beside reasoning")
    # vLLM's --generation-config: where the default sampling parameters come from
    generation_config: str = option(
        "auto", "sampling defaults: auto (the model's generation_config.json), vllm (none) or a directory holding one")
    # structured outputs: grammars compile in processes of their own, each within this budget
    # (past it: 400, and the spec is refused at once from then on)
    grammar_compile_timeout: float = option(10.0, "seconds of CPU one grammar compile may take (400 past it)")
    # compiled grammars kept (LRU, by bytes); one grammar may take a quarter of it (400 past it)
    grammar_cache_memory: int = option(512 * 2**20, "memory for compiled grammars, e.g. 512MiB", kind="bytes")
    # None: half the cores, 1 to 4
    grammar_compile_workers: int | None = option(None, "grammar compile processes (default: half the cores, 1-4)")
    # /v1/responses: the in-memory store behind store=true, previous_response_id and GET/DELETE
    responses_store_max_entries: int = option(1000, "responses kept for previous_response_id and GET (0: none)")
    responses_store_max_bytes: int = option(64 * 2**20, "memory for stored responses, e.g. 64MiB", kind="bytes")
    responses_store_ttl: float = option(3600.0, "seconds a stored response is kept")
    log_format: LogFormat = option("text", "log line format")
    log_level: LogLevel = option("info", "log level")
    ui: bool = option(True, "serve the web playground at / (--no-ui: off)")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                              f"not {self.tool_call_parser!r}")
        if self.generation_config not in ("auto", "vllm") and not (
                Path(self.generation_config) / "generation_config.json").is_file():
            raise ConfigError(f"generation_config must be auto, vllm or a directory holding generation_config.json, "
                              f"not {self.generation_config!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                              f"{', '.join(TOOL_CALL_PARSERS)})")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty (an empty key would disable authentication); "
                              "leave --api-key / MOE_SERVE_API_KEY unset to run without one")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in [0, 65535]")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ConfigError("limit_concurrency must be >= 1")
        check_range(self, "body_read_timeout", 0.0, MAX_SECONDS, low_open=True)
        if self.log_format not in get_args(LogFormat):
            raise ConfigError("log_format must be text or json")
        check_range(self, "request_timeout", 0.0, MAX_SECONDS, low_open=True)
        check_range(self, "drain_timeout", 0.0, MAX_SECONDS)
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")
        if self.responses_store_max_entries < 0:
            raise ConfigError("responses_store_max_entries must be >= 0")
        check_range(self, "responses_store_ttl", 0.0, MAX_SECONDS, low_open=True)
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be >= 1024")
        try:
            self.grammar_limits  # noqa: B018 - validates the grammar_* fields
        except ValueError as e:
            raise ConfigError(str(e).replace("the grammar compile timeout", "grammar_compile_timeout")) from None

    @property
    def grammar_limits(self) -> GrammarLimits:
        kw = {} if self.grammar_compile_workers is None else {"workers": self.grammar_compile_workers}
        return GrammarLimits(timeout=self.grammar_compile_timeout, cache_bytes=self.grammar_cache_memory, **kw)

    def effective_allowed_hosts(self) -> tuple[str, ...]:
        """The Host allow-list in force ("*" alone: any host)."""
        if self.allowed_hosts:
            return tuple(h.lower() for h in self.allowed_hosts)
        if self.host in LOOPBACK_HOSTS:
            return LOOPBACK_HOSTS
        return ("*",)

    @property
    def exempt_paths(self) -> tuple[str, ...]:
        """Paths open without the API key."""
        if self.metrics_require_auth:
            return tuple(p for p in self.auth_exempt_paths if p != "/metrics")
        return self.auth_exempt_paths
