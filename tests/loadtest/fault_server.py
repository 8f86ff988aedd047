"""`python -m tests.loadtest.fault_server <moe-serve flags>`: the real `moe-serve` CLI with the
MOE_SERVE_FAULT_INJECT hook (tests/loadtest/faults.py) installed on the native engine core.

Fault injection is a test tool: the production entry point (`moe-serve`, `python -m server.cli`)
never reads MOE_SERVE_FAULT_INJECT; only this test entry point wraps the engine factory with it.
"""

from __future__ import annotations

import sys

from server.engine import factory
from tests.loadtest import faults

_build = factory.build_native_core


def _build_with_faults(*args, **kwargs):
    core, info = _build(*args, **kwargs)
    faults.install_from_env(core)
    return core, info


factory.build_native_core = _build_with_faults

if __name__ == "__main__":
    from server.cli import main

    main(sys.argv[1:])
