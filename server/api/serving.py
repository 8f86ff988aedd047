"""The serving layer: one `Serving` per app (on `app.state.serving`) that endpoints call into.

It composes the pieces a request goes through on its way to the engine: `limits` (context
length, prompt count, capacity, max_tokens: server/api/limits.py), `tokens` (tokenizer and chat
template on their own thread: server/api/tokenizing.py), `sampling_params` (server/api/sampling.py),
`grammars` (structured outputs compiled in a pool of their own: server/engine/structured/service.py),
then `start_generation`. It never reaches into the engine beyond the `EngineClient` protocol
(`model_info`, `tokenizer`, `in_flight`, `generate`, `abort`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.requests import Request

from server.api.encoder import ResponseEncoder
from server.api.errors import model_not_found
from server.api.generation import GenerationStream
from server.api.generation_defaults import apply_defaults, describe, load_defaults
from server.api.grammars import compile_for_request
from server.api.inflight import InflightGenerations
from server.api.limits import Limits
from server.api.reasoning import REASONING_PARSERS
from server.api.sampling import build_sampling_params
from server.api.tokenizing import Tokenizing
from server.api.tokens import TokenText
from server.api.tracing import Tracing
from server.api.tool_parsers import TOOL_PARSERS
from server.config import ServerConfig
from server.engine.request import EngineRequest, SamplingParams
from server.engine.structured.service import GrammarService
from server.engine.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.engine.served_model_name or engine.model_info.name
        self.created = int(time.time())
        self.limits = Limits(engine)
        self.tokens = Tokenizing(engine.tokenizer, self.limits, config.chat_template)
        self.token_text = TokenText(engine.tokenizer)
        self.encoder = ResponseEncoder()  # whole answers and big chunks are built and serialized there
        # --tool-call-parser / --reasoning-parser (vLLM's names); parsers are stateless, one each
        self.tool_parser = TOOL_PARSERS[config.tool_call_parser]() if config.tool_call_parser else None
        self.reasoning_parser = REASONING_PARSERS.get(config.engine.reasoning_parser or "")
        self.warned_auto_without_parser = False  # tool_choice auto without a parser: text content (chat_setup)
        if self.tool_parser is None:
            logger.warning("no --tool-call-parser: requests with tool_choice 'auto' (what agents send with their "
                           "tools) are answered with the model's text as content, no tool calls")
        # grammar compiles: in processes of their own (started with the first one), cached by bytes
        self.grammars = GrammarService(engine.tokenizer, self.limits.vocab_size,
                                       tuple(getattr(engine.model_info, "eos_token_ids", ())), config.grammar_limits)
        self.generations = InflightGenerations()  # what a drain past its deadline ends (server/serve.py)
        # --otlp-traces-endpoint: spans per request (None: off, nothing imported)
        self.tracing = Tracing.create(config.engine.otlp_traces_endpoint, self.model_name)
        # --generation-config: default sampling parameters from the model's generation_config.json
        self.generation_defaults, path = load_defaults(config.generation_config, config.engine.model)
        logger.info("%s", describe(self.generation_defaults, path, config.generation_config))

    def close(self) -> None:
        self.tokens.close()
        self.encoder.close()
        self.grammars.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports what is buffered

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        """SamplingParams of a request's fields (None: unset), the --generation-config defaults
        filled in (server/api/generation_defaults.py)."""
        return build_sampling_params(self.limits.vocab_size, **apply_defaults(kwargs, self.generation_defaults))

    async def compile_structured(self, spec: StructuredSpec, request: Request | None = None) -> Any:
        """The spec's compiled grammar (cached; compiled in the compile pool): a 400 naming the
        parameter when it is refused; the wait ends when the request's client disconnects."""
        return await compile_for_request(self.grammars, spec, request.receive if request is not None else None)

    @property
    def grammar_cache(self) -> Any:
        return self.grammars.cache

    async def start_generation(self, request: Request, requests: list[EngineRequest],
                               stream: bool) -> GenerationStream:
        """Submit and wait for the first outputs (the engine refuses what it cannot queue: 429).
        While waiting, a disconnect aborts."""
        trace = self.tracing.start(request.headers, requests) if self.tracing is not None else None
        gen = GenerationStream(self.engine, requests, self.config.request_timeout, receive=request.receive,
                               registry=self.generations, trace=trace)
        await gen.start()
        if stream:
            gen.stop_watching_disconnect()
        return gen
