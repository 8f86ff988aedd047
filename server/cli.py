"""`moe-serve`: command-line flags (vLLM's names) -> ServerConfig -> engine -> uvicorn.

The flags are generated from the config dataclasses' fields (server/config.py: name, type,
`Literal` choices, default and help text live there only). Every flag can also come from the
environment as `MOE_SERVE_<FLAG>` (dashes become underscores, e.g. `MOE_SERVE_MAX_NUM_SEQS=8`);
a flag on the command line wins. Heavy modules (torch, uvicorn, the engine) are imported after
the arguments are parsed, so `moe-serve --help` is quick. Serving and the SIGTERM drain:
server/serve.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from server.config import BUNDLED_MODEL, ConfigError, EngineConfig, ServerConfig, parse_bytes

ENV_PREFIX = "MOE_SERVE_"
logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag, generated from a config field (server/config.py `option`)."""

    flag: str  # --max-num-seqs
    field: str  # max_num_seqs
    kind: str  # int | float | str | bytes | bool | list | choice
    help: str
    default: Any
    choices: tuple[str, ...] = ()
    shown: str | None = None  # the default as --help shows it, when not the value itself
    env_in_help: bool = True

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.lstrip("-").replace("-", "_").upper()


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    """A field's annotation -> (kind, choices): Optional is unwrapped, a Literal gives choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return "list", ()
    if annotation in (bool, int, float, str):
        return annotation.__name__, ()
    raise TypeError(f"no flag kind for the config annotation {annotation!r}")


def config_flags(cls: type) -> list[Flag]:
    """The flags of a config dataclass: every field with `help` metadata, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, choices = _kind(hints[f.name])
        out.append(Flag("--" + f.name.replace("_", "-"), f.name, f.metadata["kind"] or kind, f.metadata["help"],
                        f.default, choices, f.metadata["shown"], f.metadata["env_in_help"]))
    return out


ENGINE_FLAGS = config_flags(EngineConfig)
SERVER_FLAGS = config_flags(ServerConfig)


def parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), not {value!r}")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(value).split(",") if p.strip())


def _bytes_arg(value: str) -> int:
    try:
        return int(parse_bytes(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size like 512MiB or 2GiB, not {value!r}") from None


_CONVERT: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bytes": _bytes_arg,
                                             "list": parse_list, "bool": parse_bool}


def _help(flag: Flag) -> str:
    if not flag.env_in_help:
        return f"{flag.help} [default: none]"
    shown = flag.shown or (",".join(flag.default) if isinstance(flag.default, tuple) else flag.default)
    return f"{flag.help} [env {flag.env}; default {shown}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-serve", description="OpenAI-compatible server for Mixture-of-Experts models. "
        "Every flag can also be set as MOE_SERVE_<FLAG> in the environment (the flag wins).")
    for title, flags in (("engine", ENGINE_FLAGS), ("server", SERVER_FLAGS)):
        group = parser.add_argument_group(title)
        for flag in flags:
            if flag.kind == "bool":
                group.add_argument(flag.flag, dest=flag.field, action=argparse.BooleanOptionalAction, default=None,
                                   help=_help(flag))
            elif flag.kind == "choice":
                group.add_argument(flag.flag, dest=flag.field, choices=flag.choices, default=None, help=_help(flag))
            else:
                group.add_argument(flag.flag, dest=flag.field, type=_CONVERT[flag.kind], default=None,
                                   help=_help(flag))
    return parser


def _env_values(parser: argparse.ArgumentParser, environ: dict[str, str]) -> dict[str, Any]:
    """MOE_SERVE_<FLAG> values, converted exactly as the flag's value would be."""
    out: dict[str, Any] = {}
    for flag in ENGINE_FLAGS + SERVER_FLAGS:
        raw = environ.get(flag.env)
        if raw is None:
            continue
        try:
            if flag.kind == "choice":
                if raw not in flag.choices:
                    raise argparse.ArgumentTypeError(f"expected one of {', '.join(flag.choices)}")
                out[flag.field] = raw
            else:
                out[flag.field] = _CONVERT[flag.kind](raw)
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"environment variable {flag.env}={raw!r}: {e}")
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


def use_cache_dir(engine: EngineConfig, environ: Any = os.environ) -> None:
    """Send the run-time caches under --cache-dir (creating it; an OSError where it cannot be
    written): sets the variables torch, Triton, Hugging Face and vLLM read. A variable set
    already in the environment (TRITON_CACHE_DIR, ...) is kept: the operator's choice wins."""
    env = engine.cache_environment()
    if not env:
        return
    root = env["MOE_SERVE_CACHE_DIR"]
    os.makedirs(root, exist_ok=True)
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(f"{root} is not writable by this user (uid {os.getuid()})")
    for name, value in env.items():
        if name == "MOE_SERVE_CACHE_DIR" or not environ.get(name):
            environ[name] = value
    logger.info("caches under %s", root)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = build_config(argv)
    except ConfigError as e:
        print(f"moe-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    from server.logging_setup import configure_logging

    configure_logging(config.log_format, config.log_level)
    try:
        use_cache_dir(config.engine)
    except OSError as e:
        logger.error("--cache-dir %s: %s", config.engine.cache_dir, e)
        sys.exit(2)
    try:
        from server.engine.factory import build_engine

        engine = build_engine(config.engine)
    except (ConfigError, ValueError) as e:  # e.g. --max-model-len beyond the model or the KV cache
        logger.error("invalid configuration: %s", e)
        sys.exit(2)
    except (FileNotFoundError, NotADirectoryError, OSError) as e:
        logger.error("cannot load the model %s: %s", config.engine.model, e)
        sys.exit(2)
    from server.serve import run

    sys.exit(run(config, engine))


if __name__ == "__main__":
    main()
