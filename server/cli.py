"""`moe-serve`: command-line flags (vLLM's names) -> ServerConfig -> engine -> uvicorn.

Every flag can also come from the environment as `MOE_SERVE_<FLAG>` (dashes become
underscores, e.g. `MOE_SERVE_MAX_NUM_SEQS=8`); a flag on the command line wins. Defaults live
in `server.config` only. Heavy modules (torch, the engine) are imported after the arguments
are parsed, so `moe-serve --help` is quick.

SIGTERM / SIGINT drain: `/ready` turns 503, new requests get 503 with Retry-After, requests in
flight get `--drain-timeout` seconds to finish, then the server stops and the process exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from server.config import (BUNDLED_MODEL, REASONING_PARSERS, TOOL_CALL_PARSERS, ConfigError, EngineConfig,
                           ServerConfig, _parse_bytes)

ENV_PREFIX = "MOE_SERVE_"
logger = logging.getLogger("moe_serve.cli")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# (flag, config field, kind, help); kind: int | float | str | bytes | bool | list | choice:<a,b>
ENGINE_FLAGS: list[tuple[str, str, str, str]] = [
    ("--model", "model", "str", "model directory (HF layout); default: the bundled tiny checkpoint"),
    ("--served-model-name", "served_model_name", "str", "model name in the API (default: directory name)"),
    ("--engine", "engine", "choice:native,vllm", "inference engine"),
    ("--dtype", "dtype", "choice:auto,float32,bfloat16,float16,fp32,bf16,fp16,half,float", "weight dtype"),
    ("--device", "device", "str", "auto, cpu, cuda or cuda:N"),
    ("--max-model-len", "max_model_len", "int", "context length (prompt + completion)"),
    ("--max-num-seqs", "max_num_seqs", "int", "most sequences per batch"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", "int", "most tokens per engine step"),
    ("--block-size", "block_size", "int", "KV-cache block size in tokens (power of two)"),
    ("--kv-cache-memory", "kv_cache_memory", "bytes", "KV-cache size, e.g. 512MiB or 2GiB"),
    ("--num-kv-blocks", "num_kv_blocks", "int", "number of KV blocks (overrides --kv-cache-memory)"),
    ("--enable-prefix-caching", "enable_prefix_caching", "bool", "reuse KV blocks of shared prefixes"),
    ("--enable-chunked-prefill", "enable_chunked_prefill", "bool", "split long prefills across steps"),
    ("--enforce-eager", "enforce_eager", "bool", "no CUDA graphs for decode steps (native engine on CUDA)"),
    ("--scheduling-policy", "scheduling_policy", "choice:fcfs,priority", "scheduling policy"),
    ("--max-queue-len", "max_queue_len", "int", "waiting requests past which the API answers 429"),
    ("--seed", "seed", "int", "engine seed"),
    ("--expert-placement", "expert_placement", "choice:contiguous,round_robin,balanced", "expert placement"),
    ("--expert-devices", "expert_devices", "list", "comma-separated devices for experts"),
    ("--num-redundant-experts", "num_redundant_experts", "int", "extra expert replicas"),
    ("--gpu-expert-budget", "gpu_expert_budget", "str", "GPU memory for experts (e.g. 4GiB) or a count"),
    ("--rebalance-interval", "rebalance_interval", "int", "steps between placement rebalances (0: never)"),
    ("--record-routing", "record_routing", "str", "file to record per-step routing to"),
    ("--expert-capacity-factor", "expert_capacity_factor", "float",
     "Switch-style expert capacity per step (tokens past it are dropped; off when unset)"),
    ("--engine-progress-timeout", "engine_progress_timeout", "float",
     "seconds with requests but no token computed before the engine counts as dead (0: off)"),
    ("--tensor-parallel-size", "tensor_parallel_size", "int", "vLLM: tensor-parallel size"),
    ("--data-parallel-size", "data_parallel_size", "int", "vLLM: data-parallel size"),
    ("--enable-expert-parallel", "enable_expert_parallel", "bool", "vLLM: expert parallelism"),
    ("--enable-eplb", "enable_eplb", "bool", "vLLM: expert-parallel load balancer"),
    ("--eplb-config", "eplb_config", "str", "vLLM: EPLB config (JSON)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", "float", "vLLM: fraction of GPU memory"),
    ("--reasoning-parser", "reasoning_parser", "choice:" + ",".join(REASONING_PARSERS),
     "split <think> reasoning into reasoning_content; structured output starts after it"),
]
SERVER_FLAGS: list[tuple[str, str, str, str]] = [
    ("--host", "host", "str", "address to bind"),
    ("--port", "port", "int", "port to bind (0: any free port)"),
    ("--api-key", "api_key", "str", "require 'Authorization: Bearer <key>' (env MOE_SERVE_API_KEY)"),
    ("--auth-exempt-paths", "auth_exempt_paths", "list", "comma-separated paths open without a key"),
    ("--request-timeout", "request_timeout", "float", "seconds a request may take before 504"),
    ("--drain-timeout", "drain_timeout", "float", "seconds in-flight requests get after SIGTERM"),
    ("--max-body-bytes", "max_body_bytes", "bytes", "largest request body (413 past it), e.g. 4MiB"),
    ("--max-header-bytes", "max_header_bytes", "bytes", "largest request head (400 past it)"),
    ("--metrics-require-auth", "metrics_require_auth", "bool", "/metrics needs the API key too"),
    ("--allowed-hosts", "allowed_hosts", "list",
     "Host header allow-list, comma-separated (default: loopback names when bound to loopback, else any)"),
    ("--limit-concurrency", "limit_concurrency", "int", "open connections/tasks before 503"),
    ("--body-read-timeout", "body_read_timeout", "float", "seconds to receive a request body (408 past it)"),
    ("--tool-call-parser", "tool_call_parser", "choice:" + ",".join(TOOL_CALL_PARSERS),
     "parser of the model's tool-call format (tool_choice auto)"),
    ("--enable-auto-tool-choice", "enable_auto_tool_choice", "bool", "vLLM compatibility: needs --tool-call-parser"),
    ("--chat-template", "chat_template", "str", "chat template (Jinja text or a file) instead of the tokenizer's"),
    ("--log-format", "log_format", "choice:text,json", "log line format"),
    ("--log-level", "log_level", "choice:debug,info,warning,error,critical", "log level"),
    ("--ui", "ui", "bool", "serve the web playground at / (--no-ui: off)"),
]


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), not {value!r}")


def _parse_list(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(value).split(",") if p.strip())


def _bytes_arg(value: str) -> int:
    try:
        return int(_parse_bytes(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size like 512MiB or 2GiB, not {value!r}") from None


_CONVERT: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bytes": _bytes_arg,
                                             "list": _parse_list, "bool": _parse_bool}


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in (EngineConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-serve", description="OpenAI-compatible server for Mixture-of-Experts models. "
        "Every flag can also be set as MOE_SERVE_<FLAG> in the environment (the flag wins).")
    defaults = _defaults()
    groups = (("engine", ENGINE_FLAGS), ("server", SERVER_FLAGS))
    for title, flags in groups:
        group = parser.add_argument_group(title)
        for flag, field, kind, help_text in flags:
            default = defaults.get(field)
            if field == "model":
                default = "bundled tiny-mixtral"
            shown = ",".join(default) if isinstance(default, tuple) else default
            text = f"{help_text} [env {_env_name(flag)}; default {shown}]"
            if field == "api_key":
                text = f"{help_text} [default: none]"
            if kind == "bool":
                group.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None,
                                   help=text)
            elif kind.startswith("choice:"):
                group.add_argument(flag, dest=field, choices=kind.split(":", 1)[1].split(","), default=None,
                                   help=text)
            else:
                group.add_argument(flag, dest=field, type=_CONVERT[kind], default=None, help=text)
    return parser


def _env_values(parser: argparse.ArgumentParser, environ: dict[str, str]) -> dict[str, Any]:
    """MOE_SERVE_<FLAG> values, converted exactly as the flag's value would be."""
    out: dict[str, Any] = {}
    for flag, field, kind, _ in ENGINE_FLAGS + SERVER_FLAGS:
        raw = environ.get(_env_name(flag))
        if raw is None:
            continue
        try:
            if kind.startswith("choice:"):
                choices = kind.split(":", 1)[1].split(",")
                if raw not in choices:
                    raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}")
                out[field] = raw
            else:
                out[field] = _CONVERT[kind](raw)
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"environment variable {_env_name(flag)}={raw!r}: {e}")
    return out


def build_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Flags over environment over defaults; raises ConfigError on invalid combinations."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = _env_values(parser, dict(os.environ if environ is None else environ))
    values.update({k: v for k, v in vars(args).items() if v is not None})
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine_kwargs = {k: v for k, v in values.items() if k in engine_fields}
    server_kwargs = {k: v for k, v in values.items() if k not in engine_fields}
    engine_kwargs.setdefault("model", BUNDLED_MODEL)
    return ServerConfig(engine=EngineConfig(**engine_kwargs), **server_kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = build_config(argv)
    except ConfigError as e:
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    from server.logging_setup import configure_logging

    configure_logging(config.log_format, config.log_level)
    try:
        from server.engine.factory import build_engine

        engine = build_engine(config.engine)
    except (ConfigError, ValueError) as e:  # e.g. --max-model-len beyond the model or the KV cache
        logger.error("invalid configuration: %s", e)
        sys.exit(2)
    except (FileNotFoundError, NotADirectoryError, OSError) as e:
        logger.error("cannot load the model %s: %s", config.engine.model, e)
        sys.exit(2)
    sys.exit(run(config, engine))


def run(config: ServerConfig, engine: Any) -> int:
    """Serve until a signal (drained) or an engine failure; returns the exit code."""
    import uvicorn

    from server.app import create_app

    app = create_app(engine, config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, http="h11", lifespan="on", log_config=None,
        access_log=False, h11_max_incomplete_event_size=config.max_header_bytes,
        limit_concurrency=config.limit_concurrency,
        timeout_graceful_shutdown=2, timeout_keep_alive=5, server_header=False)
    server = draining_server(uv_config, app.state, config.drain_timeout)
    asyncio.run(server.serve())
    if not server.started:
        logger.error("the server did not start")
        return 1
    return server.exit_code


def draining_server(config: Any, state: Any, drain_timeout: float) -> Any:
    """A uvicorn.Server whose SIGTERM/SIGINT drains first. The class is defined here, not at
    module level, so that `moe-serve --help` does not import uvicorn."""
    import uvicorn

    class _Server(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.exit_code = 0
            self._drain_started = False
            self._loop: asyncio.AbstractEventLoop | None = None
            self._watchdog: asyncio.Task[None] | None = None
            self._drain_task: asyncio.Task[None] | None = None

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                self._watchdog = asyncio.create_task(self._watch_engine())

        def handle_exit(self, sig: int, frame: Any) -> None:  # signal handler, main thread
            if self._drain_started or self.should_exit:
                logger.warning("second signal %s: stopping now", signal.Signals(sig).name)
                self.should_exit = True
                self.force_exit = sig == signal.SIGINT
                return
            self._drain_started = True
            state.draining = True
            if self._loop is None:
                self.should_exit = True
                return
            self._loop.call_soon_threadsafe(self._start_drain, sig)

        def _start_drain(self, sig: int) -> None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(sig))

        async def _drain(self, sig: int) -> None:
            logger.info("%s: draining (%d request(s) in flight, up to %.1fs)",
                        signal.Signals(sig).name, state.inflight, drain_timeout)
            deadline = time.monotonic() + drain_timeout
            while time.monotonic() < deadline:
                if state.inflight <= 0 and state.engine.num_unfinished_requests() == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                logger.warning("drain timeout: %d request(s) still in flight; stopping anyway",
                               state.inflight)
            self.should_exit = True

        async def _watch_engine(self) -> None:
            from server.engine.protocol import EngineDeadError

            while not self.should_exit:
                await asyncio.sleep(1.0)
                try:
                    await state.engine.check_health()
                except EngineDeadError as e:
                    logger.error("the engine died: %s; exiting", e)
                    self.exit_code = 1
                    self.should_exit = True
                except Exception:
                    logger.exception("health check failed")

        async def shutdown(self, sockets: Any = None) -> None:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await super().shutdown(sockets)

    return _Server()


if __name__ == "__main__":
    main()
