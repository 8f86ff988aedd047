"""The production import path holds no test tools: fault injection and the fake engine load
only through test entry points (tests/loadtest/fault_server.py, tests/server/_fake_server.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PRODUCTION = "import server.cli, server.app, server.serve, server.engine.factory"


def test_production_modules_import_no_test_tools() -> None:
    code = (f"import sys; {PRODUCTION}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tests'\n"
            "             or m.rsplit('.', 1)[-1] in ('faults', '_fake_engine', '_fake_server')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_the_fault_entry_point_does_load_the_injector() -> None:
    """The check above can fail: the test entry point imports the injector into the same path."""
    code = ("import sys; import tests.loadtest.fault_server\n"
            "print('tests.loadtest.faults' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"


def test_the_production_factory_ignores_the_fault_variable(monkeypatch) -> None:
    """MOE_SERVE_FAULT_INJECT set: an engine built by the production factory has no fault hook."""
    from server.config import EngineConfig
    from server.engine.factory import build_native_core

    monkeypatch.setenv("MOE_SERVE_FAULT_INJECT", "every=1")
    core, _ = build_native_core(EngineConfig(num_kv_blocks=16, max_model_len=64, dtype="float32"), progress=False)
    assert core.fault_hook is None
    assert not [p for p in (REPO / "server").rglob("*.py") if "FAULT_INJECT" in p.read_text()]


def test_a_started_server_holds_neither_sympy_nor_xgrammar() -> None:
    """Memory: loading a model and building the app import neither sympy (PyTorch's Python
    empty_like of meta tensors imported it through torch.fx's symbolic shapes, ~28 MB) nor
    xgrammar (~45 MB with its libraries) until a grammar is compiled; then xgrammar loads."""
    code = ("import sys, asyncio\n"
            "from server.config import EngineConfig, ServerConfig\n"
            "from server.engine.factory import build_engine\n"
            "from server.app import create_app\n"
            "from server.engine.structured.spec import json_schema_spec\n"
            "cfg = ServerConfig(engine=EngineConfig(num_kv_blocks=16, max_model_len=64, dtype='float32'))\n"
            "engine = build_engine(cfg.engine)\n"
            "app = create_app(engine, cfg)\n"
            "asyncio.run(engine.start())\n"
            "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes', 'xgrammar') if m in sys.modules))\n"
            "app.state.serving.grammars.compiler.compile(json_schema_spec({'type': 'integer'}, 'response_format'))\n"
            "print('xgrammar' in sys.modules)\n"
            "asyncio.run(engine.shutdown())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "True"], r.stdout
