"""`moe-serve` flags: vLLM's names, MOE_SERVE_* environment variables (the flag wins), clean
exit 2 on bad configuration, and a --help that does not import torch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from server.cli import ENGINE_FLAGS, SERVER_FLAGS, build_config
from server.config import BUNDLED_MODEL, EngineConfig, ServerConfig

VLLM_FLAGS = ["--model", "--served-model-name", "--host", "--port", "--dtype", "--device", "--max-model-len",
              "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--kv-cache-memory",
              "--num-kv-blocks", "--enable-prefix-caching", "--scheduling-policy", "--api-key", "--engine",
              "--max-queue-len", "--request-timeout", "--drain-timeout", "--max-body-bytes", "--log-format",
              "--log-level", "--seed", "--expert-placement", "--expert-devices", "--num-redundant-experts",
              "--gpu-expert-budget", "--rebalance-interval", "--record-routing", "--tensor-parallel-size",
              "--data-parallel-size", "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
              "--gpu-memory-utilization"]


def test_help_is_fast_and_lists_every_flag() -> None:
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import sys; from server.cli import main\n"
                        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules]\n"
                        "print('HEAVY', heavy)"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 10
    for flag in VLLM_FLAGS + ["--no-enable-prefix-caching"]:
        assert flag in r.stdout, flag
    assert "HEAVY []" in r.stdout


def test_defaults_come_from_the_config_dataclasses() -> None:
    cfg = build_config([], environ={})
    assert cfg == ServerConfig(engine=EngineConfig(model=BUNDLED_MODEL))


def test_flags_map_onto_config() -> None:
    cfg = build_config(["--model", "/m", "--served-model-name", "x", "--port", "0", "--max-model-len", "64",
                        "--kv-cache-memory", "2GiB", "--no-enable-prefix-caching", "--expert-devices", "cpu, cuda:0",
                        "--max-body-bytes", "1MiB", "--api-key", "k", "--request-timeout", "2.5",
                        "--enable-eplb", "--log-format", "json", "--dtype", "bfloat16"], environ={})
    e = cfg.engine
    assert (e.model, e.served_model_name, e.max_model_len, e.kv_cache_memory) == ("/m", "x", 64, 2 * 2**30)
    assert e.enable_prefix_caching is False and e.enable_eplb is True and e.dtype == "bfloat16"
    assert e.expert_devices == ("cpu", "cuda:0")
    assert (cfg.port, cfg.max_body_bytes, cfg.api_key, cfg.request_timeout, cfg.log_format) == \
        (0, 2**20, "k", 2.5, "json")


def test_env_vars_and_flag_precedence() -> None:
    env = {"MOE_SERVE_API_KEY": "from-env", "MOE_SERVE_MAX_NUM_SEQS": "8", "MOE_SERVE_PORT": "9000",
           "MOE_SERVE_ENABLE_PREFIX_CACHING": "false", "MOE_SERVE_KV_CACHE_MEMORY": "512MiB"}
    cfg = build_config([], environ=env)
    assert cfg.api_key == "from-env" and cfg.engine.max_num_seqs == 8 and cfg.port == 9000
    assert cfg.engine.enable_prefix_caching is False and cfg.engine.kv_cache_memory == 512 * 2**20
    cfg = build_config(["--port", "9100", "--enable-prefix-caching"], environ=env)
    assert cfg.port == 9100 and cfg.engine.enable_prefix_caching is True


def test_every_flag_documents_its_env_var() -> None:
    from server.cli import build_parser

    text = build_parser().format_help().replace("\n", " ")
    for flag in ENGINE_FLAGS + SERVER_FLAGS:
        if flag.field != "api_key":
            assert "MOE_SERVE_" + flag.flag[2:].replace("-", "_").upper() in text.replace(" ", ""), flag.flag


@pytest.mark.parametrize("argv,env", [
    (["--block-size", "3"], {}),
    (["--engine", "tensorrt"], {}),
    (["--port", "notaport"], {}),
    (["--max-num-seqs", "0"], {}),
    (["--kv-cache-memory", "lots"], {}),
    (["--log-format", "xml"], {}),
    ([], {"MOE_SERVE_MAX_NUM_SEQS": "many"}),
    ([], {"MOE_SERVE_LOG_FORMAT": "xml"}),
    (["--model", "/nonexistent/model"], {}),
    # an empty key would silently disable authentication (hardening item 10)
    (["--api-key", ""], {}),
    ([], {"MOE_SERVE_API_KEY": ""}),
    ([], {"MOE_SERVE_API_KEY": "   "}),
    # a prompt longer than the step budget could never run without chunked prefill (item 8)
    (["--no-enable-chunked-prefill", "--max-num-batched-tokens", "32", "--max-model-len", "128"], {}),
])
def test_bad_configuration_exits_2(argv: list[str], env: dict[str, str]) -> None:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_SERVE_")} | env
    r = subprocess.run([sys.executable, "-m", "server.cli", "--port", "0", *argv], capture_output=True, text=True,
                       env=full_env, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert "error" in r.stderr.lower()


def test_readme_configuration_table_lists_exactly_the_parser_flags() -> None:
    """The README's configuration table and `moe-serve --help` name the same flags."""
    import re

    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Configuration"):]
    section = section[:section.index("\n## ", 5)]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `--")]
    documented = {"--" + m for cell in first_cells for m in re.findall(r"--(?:\[no-\])?([a-z0-9-]+)", cell)}
    parser_flags = {flag.flag for flag in ENGINE_FLAGS + SERVER_FLAGS}
    assert documented == parser_flags, (sorted(parser_flags - documented), sorted(documented - parser_flags))


def test_flags_are_generated_from_every_config_field() -> None:
    """One source: each config field (bar the nested engine config) is a flag whose choices are
    its Literal's, and whose kind follows its annotation."""
    import dataclasses

    from typing import get_args

    from server.config import Dtype

    flags = {flag.field: flag for flag in ENGINE_FLAGS + SERVER_FLAGS}
    fields = {f.name for cls in (EngineConfig, ServerConfig) for f in dataclasses.fields(cls)} - {"engine"}
    assert fields | {"engine"} == set(flags) | {"engine"} and "engine" in {f.field for f in ENGINE_FLAGS}
    assert flags["dtype"].choices == get_args(Dtype)
    assert (flags["kv_cache_memory"].kind, flags["max_body_bytes"].kind) == ("bytes", "bytes")
    assert (flags["max_num_seqs"].kind, flags["expert_devices"].kind, flags["ui"].kind) == ("int", "list", "bool")
    assert flags["reasoning_parser"].choices == ("deepseek_r1", "qwen3", "openai_gptoss")


def test_parse_bytes_is_the_one_size_grammar() -> None:
    from server.config import parse_bytes

    assert [parse_bytes(v) for v in ("2GiB", "512M", "3e9B", "1e9", "2.5kib", "1 KB", 1234, None)] == \
        [2 * 2**30, 512 * 2**20, 3 * 10**9, 10**9, 2560, 1000, 1234, None]
    assert parse_bytes("2MiB", require_unit=True) == 2 * 2**20
    for bad, unit in (("-1GiB", False), ("lots", False), ("2XB", False), ("", False), ("4", True)):
        with pytest.raises(ValueError, match="expected a size"):
            parse_bytes(bad, require_unit=unit)


@pytest.mark.parametrize("argv,env,flag", [
    (["--expert-capacity-factor", "inf"], {}, "--expert-capacity-factor"),
    (["--expert-capacity-factor", "1e308"], {}, "--expert-capacity-factor"),  # ceil(f * tokens * k / E) overflows
    (["--expert-capacity-factor", "nan"], {}, "--expert-capacity-factor"),
    (["--drain-timeout", "nan"], {}, "--drain-timeout"),
    (["--request-timeout", "inf"], {}, "--request-timeout"),
    (["--body-read-timeout=-inf"], {}, "--body-read-timeout"),
    (["--engine-progress-timeout", "nan"], {}, "--engine-progress-timeout"),
    (["--gpu-memory-utilization", "nan"], {}, "--gpu-memory-utilization"),
    ([], {"MOE_SERVE_DRAIN_TIMEOUT": "NaN"}, "--drain-timeout"),
    ([], {"MOE_SERVE_EXPERT_CAPACITY_FACTOR": "Infinity"}, "--expert-capacity-factor"),
    (["--drain-timeout", "1e300"], {}, "--drain-timeout"),  # a duration no timer can hold
    (["--kv-cache-memory", "1e999"], {}, "--kv-cache-memory"),  # an infinite size
])
def test_non_finite_or_absurd_numbers_exit_2_naming_the_flag(argv: list[str], env: dict[str, str], flag: str) -> None:
    """Hardening round 2, item 7: `--expert-capacity-factor inf` used to start a server whose every
    request failed with 500 (the engine then declared dead); `--drain-timeout nan` drained for 0 s.
    Every float option (flag, env var, hence Helm value) is refused at startup, naming the flag."""
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_SERVE_")} | env
    try:
        r = subprocess.run([sys.executable, "-m", "server.cli", "--port", "0", *argv], capture_output=True,
                           text=True, env=full_env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv or env} was accepted: the server started")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert flag in r.stderr, r.stderr[-1000:]


def test_finite_floats_in_range_are_accepted() -> None:
    cfg = build_config(["--expert-capacity-factor", "1.25", "--drain-timeout", "0", "--request-timeout", "1e6",
                        "--engine-progress-timeout", "0", "--gpu-memory-utilization", "1"], environ={})
    assert (cfg.engine.expert_capacity_factor, cfg.drain_timeout, cfg.request_timeout) == (1.25, 0.0, 1e6)


def test_cache_dir_sends_every_cache_under_it(tmp_path) -> None:
    """--cache-dir / MOE_SERVE_CACHE_DIR: the CPU kernel builds, Triton, torch inductor, Hugging Face
    and vLLM caches go under it (created); an operator's own TRITON_CACHE_DIR etc. is kept."""
    from server.cli import use_cache_dir

    root = tmp_path / "caches"
    cfg = build_config(["--cache-dir", str(root)], environ={})
    environ = {"TRITON_CACHE_DIR": "/elsewhere/triton"}
    use_cache_dir(cfg.engine, environ)
    assert root.is_dir()
    assert environ == {"MOE_SERVE_CACHE_DIR": str(root), "TRITON_CACHE_DIR": "/elsewhere/triton",
                       "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "HF_HOME": str(root / "huggingface"),
                       "VLLM_CACHE_ROOT": str(root / "vllm"), "XDG_CACHE_HOME": str(root)}
    assert build_config([], environ={"MOE_SERVE_CACHE_DIR": "/var/cache/x"}).engine.cache_dir == "/var/cache/x"
    unset: dict[str, str] = {}
    use_cache_dir(build_config([], environ={}).engine, unset)
    assert unset == {}, "without --cache-dir every tool keeps its default"


def test_unwritable_cache_dir_exits_2_naming_the_flag(tmp_path) -> None:
    import os

    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_SERVE_")}
    r = subprocess.run([sys.executable, "-m", "server.cli", "--port", "0", "--cache-dir", str(blocker / "sub")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "--cache-dir" in r.stderr and "Traceback" not in r.stderr
