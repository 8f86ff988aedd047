"""Dev aid only: `python -m tests.server._fake_server <moe-serve flags>` serves the fake engine
through the real CLI runner (used when MOE_SERVE_TEST_FAKE_ENGINE=1, e.g. before a checkpoint
exists). The acceptance tests run `python -m server.cli` with the real engine."""

from __future__ import annotations

import sys

from server.cli import build_config
from server.logging_setup import configure_logging
from server.serve import run
from tests.server._fake_engine import FakeEngine


def main() -> None:
    config = build_config(sys.argv[1:])
    configure_logging(config.log_format, config.log_level)
    e = config.engine
    engine = FakeEngine(max_model_len=e.max_model_len or 256, max_num_seqs=e.max_num_seqs,
                        max_queue_len=e.max_queue_len, num_kv_blocks=e.num_kv_blocks or 256,
                        block_size=e.block_size, token_delay=0.003)
    sys.exit(run(config, engine))


if __name__ == "__main__":
    main()
