"""Configuration: frozen dataclasses validated when built, one source of defaults.

CLI flags (server/cli.py), environment variables (`MOE_SERVE_<FIELD>`) and Helm values map
onto these same fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BUNDLED_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "tiny-mixtral")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# vLLM's names; server/api/tool_parsers and server/api/reasoning hold the implementations
TOOL_CALL_PARSERS = ("hermes", "mistral", "llama3_json", "deepseek_v3")
REASONING_PARSERS = ("deepseek_r1", "qwen3")


class ConfigError(ValueError):
    pass


def _parse_bytes(value: str | int | None) -> int | None:
    """'2GiB', '512M', '1e9', 1234 -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = str(value).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(float(s))


@dataclass(frozen=True)
class EngineConfig:
    model: str = BUNDLED_MODEL
    served_model_name: str | None = None
    engine: str = "native"  # native | vllm
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # default: the model's max_position_embeddings (capped)
    max_num_seqs: int = 64
    # tokens per engine step; None: 2048 with chunked prefill, else max_model_len (a prompt must
    # then fit one step whole)
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; default: 512 MiB on CPU, 40% of free on CUDA
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # native engine on CUDA: no CUDA graphs for decode steps
    scheduling_policy: str = "fcfs"  # fcfs | priority
    max_queue_len: int = 1024
    seed: int = 0
    # expert placement (native engine)
    expert_placement: str = "contiguous"  # contiguous | round_robin | balanced
    expert_devices: tuple[str, ...] = ()
    num_redundant_experts: int = 0
    gpu_expert_budget: str | None = None
    rebalance_interval: int = 0
    record_routing: str | None = None
    # Switch-style expert capacity: at most ceil(factor * tokens * top_k / experts) assignments
    # per expert per step, the rest dropped (native engine); None: off (exact model outputs)
    expert_capacity_factor: float | None = None
    # seconds an engine holding requests may go without computing a token before it is
    # declared unhealthy (/health 503, the process exits); 0: no watchdog
    engine_progress_timeout: float = 300.0
    # vLLM pass-through
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    enable_eplb: bool = False
    eplb_config: str | None = None
    gpu_memory_utilization: float = 0.9
    # splits `<think>` reasoning from content (API) and starts structured output after it (engines)
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                              f"not {self.reasoning_parser!r}")
        if self.engine not in ("native", "vllm"):
            raise ConfigError(f"engine must be 'native' or 'vllm', not {self.engine!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
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
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError("scheduling_policy must be fcfs or priority")
        if self.expert_placement not in ("contiguous", "round_robin", "balanced"):
            raise ConfigError("expert_placement must be contiguous, round_robin or balanced")
        if self.num_redundant_experts < 0 or self.rebalance_interval < 0:
            raise ConfigError("num_redundant_experts and rebalance_interval must be >= 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be > 0 bytes")
        if self.expert_capacity_factor is not None and not self.expert_capacity_factor > 0:
            raise ConfigError("expert_capacity_factor must be > 0")
        if self.engine_progress_timeout < 0:
            raise ConfigError("engine_progress_timeout must be >= 0 (0: off)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    auth_exempt_paths: tuple[str, ...] = ("/health", "/ready", "/metrics", "/version")
    request_timeout: float = 600.0  # seconds per request
    drain_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    max_body_bytes: int = 4 * 2**20
    max_header_bytes: int = 64 * 2**10  # request line + headers; past it uvicorn answers 400
    log_format: str = "text"  # text | json
    log_level: str = "info"
    # /metrics needs the API key too (it shows per-expert routing counts); off by default so
    # that Prometheus scrapes without a secret, as /health and /ready probes do
    metrics_require_auth: bool = False
    # Host header allow-list (DNS-rebinding protection); empty: the loopback names when bound
    # to a loopback address, any host otherwise. Entries are host names without port; "*": any
    allowed_hosts: tuple[str, ...] = ()
    limit_concurrency: int | None = 2048  # open connections + tasks before uvicorn answers 503
    body_read_timeout: float = 30.0  # seconds a client may take to send its request body (408)
    # tool calling: the parser of the model's own tool-call format (tool_choice "auto")
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False  # vLLM's flag; accepted, needs tool_call_parser
    chat_template: str | None = None  # a Jinja template, or a file holding one, instead of the tokenizer's
    ui: bool = True  # the web playground at /

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                              f"not {self.tool_call_parser!r}")
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
        if self.body_read_timeout <= 0:
            raise ConfigError("body_read_timeout must be > 0")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be text or json")
        if self.request_timeout <= 0 or self.drain_timeout < 0:
            raise ConfigError("request_timeout must be > 0 and drain_timeout >= 0")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024")
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be >= 1024")

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
