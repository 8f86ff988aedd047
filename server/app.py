"""create_app(engine, config) -> FastAPI: the OpenAI-compatible HTTP server around an engine.

The app holds everything in `app.state` (engine, config, metrics, serving layer, draining and
ready flags, in-flight count); there is no module-level mutable state. The lifespan starts the
engine and shuts it down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.api import anthropic, chat, completions, docs, health, models, tokenize
from server.api import metrics as metrics_routes
from server.api import ui as ui_routes
from server.api.body import install_openapi
from server.api.errors import install_error_handlers
from server.api.health import server_version
from server.api.middleware import APIMiddleware
from server.api.responses_api import routes as responses_routes
from server.api.responses_api.store import ResponseStore
from server.api.serving import Serving
from server.config import ServerConfig
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def create_app(engine: Any, config: ServerConfig, metrics: ServerMetrics | None = None) -> FastAPI:
    info = engine.model_info
    if metrics is None:
        metrics = ServerMetrics(config.engine.served_model_name or info.name, config.engine.engine,
                                num_layers=info.num_moe_layers or info.num_layers, num_experts=info.num_experts,
                                max_model_len=info.max_model_len)
    metrics.set_cache_config(config.engine.kv_cache_dtype, config.engine.block_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.add_stat_logger(metrics.stat_logger)
        await engine.start()
        engine.add_placement_listener(metrics.set_placement)  # experts move when rebalancing
        placement = engine.placement()
        if placement is not None:
            try:
                metrics.set_placement(placement)
            except ValueError:
                logger.exception("engine reported a malformed expert placement")
        app.state.ready = True
        logger.info("serving %s (%s, max_model_len=%d) with the %s engine", app.state.serving.model_name,
                    info.architecture, info.max_model_len, config.engine.engine)
        try:
            yield
        finally:
            app.state.ready = False
            await engine.shutdown()
            app.state.serving.close()

    app = FastAPI(title="moe-serve", version=server_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible inference server for Mixture-of-Experts models.")
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    app.state.serving = Serving(engine, config)
    metrics.grammar.bind(app.state.serving.grammars)  # compile backlog, compile times, cache bytes
    app.state.draining = False
    app.state.ready = False
    app.state.inflight = 0
    app.state.responses_store = ResponseStore(config.responses_store_max_entries, config.responses_store_max_bytes,
                                              config.responses_store_ttl)
    for module in (completions, chat, anthropic, responses_routes, models, tokenize, health, metrics_routes):
        app.include_router(module.router)
    app.state.public_paths = ui_routes.install(app) if config.ui else frozenset()  # the web UI, open without a key
    docs.install(app)  # /docs, /redoc: from this server's files, not a CDN
    install_error_handlers(app)
    install_openapi(app)
    anthropic.install_openapi(app)  # after install_openapi: it states the served model name
    app.add_middleware(APIMiddleware, state=app.state)
    return app
