"""run(config, engine): serve an app on uvicorn until a signal (drained) or an engine failure.

SIGTERM / SIGINT drain: `/ready` turns 503, new requests get 503 with Retry-After, requests in
flight get `--drain-timeout` seconds to finish, then the server stops and the process exits 0.
Generations still running at the deadline are ended with a 503 (a stream: its error event and
`data: [DONE]`; server/api/inflight.py), given up to END_GRACE seconds to send it, then stopped.
A second signal stops at once. A watchdog stops the server (exit code 1) when the engine dies.
Imported only once the flags are parsed (server/cli.py), so `moe-serve --help` loads no uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import uvicorn

from server.api.errors import unavailable
from server.config import ServerConfig
from server.engine.protocol import EngineDeadError

logger = logging.getLogger(__name__)
END_GRACE = 2.0  # seconds the generations ended at the drain deadline get to send their last event


class DrainingServer(uvicorn.Server):
    """A uvicorn.Server whose SIGTERM/SIGINT drains first and which exits when the engine dies."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
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
        self.state.draining = True
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        state = self.state
        logger.info("%s: draining (%d request(s) in flight, up to %.1fs)",
                    signal.Signals(sig).name, state.inflight, self.drain_timeout)
        deadline = time.monotonic() + self.drain_timeout
        while time.monotonic() < deadline:
            if state.inflight <= 0 and state.engine.num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.05)
        else:
            ended = state.serving.generations.expire_all(unavailable(
                f"The server is shutting down and its drain timeout ({self.drain_timeout:g}s) ran out before this "
                f"request finished; retry on another replica."))
            logger.warning("drain timeout: %d request(s) still in flight; ending %d generation(s) with 503",
                           state.inflight, ended)
            end = time.monotonic() + END_GRACE
            while state.inflight > 0 and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self.should_exit = True

    async def _watch_engine(self) -> None:
        while not self.should_exit:
            await asyncio.sleep(1.0)
            try:
                await self.state.engine.check_health()
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


def run(config: ServerConfig, engine: Any) -> int:
    """Serve until a signal (drained) or an engine failure; returns the exit code."""
    from server.app import create_app

    app = create_app(engine, config)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, http="h11", lifespan="on", log_config=None,
        access_log=False, h11_max_incomplete_event_size=config.max_header_bytes,
        limit_concurrency=config.limit_concurrency,
        timeout_graceful_shutdown=2, timeout_keep_alive=5, server_header=False)
    server = DrainingServer(uv_config, app.state, config.drain_timeout)
    asyncio.run(server.serve())
    if not server.started:
        logger.error("the server did not start")
        return 1
    return server.exit_code
