"""`python -m tests.loadtest._serve <moe-serve flags>`: the real `moe-serve` CLI, plus the
MOE_SERVE_FAULT_INJECT hook installed on the native engine core when the engine factory does not
install it itself (server/engine/native/faults.py; once the factory calls `install_from_env`
this wrapper changes nothing)."""

from __future__ import annotations

import sys

from server.engine import factory
from server.engine.native import faults

_build = factory.build_native_core


def _build_with_faults(*args, **kwargs):
    core, info = _build(*args, **kwargs)
    if core.fault_hook is None:
        faults.install_from_env(core)
    return core, info


factory.build_native_core = _build_with_faults

if __name__ == "__main__":
    from server.cli import main

    main(sys.argv[1:])
