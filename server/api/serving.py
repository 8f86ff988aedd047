"""The serving layer: one `Serving` per app (on `app.state.serving`) that endpoints call into.

It composes the pieces a request goes through on its way to the engine: `limits` (context
length, prompt count, capacity, max_tokens: server/api/limits.py), `tokens` (tokenizer and chat
template on their own thread: server/api/tokenizing.py), `sampling_params` (server/api/sampling.py),
compiled grammars, then `start_generation`. It never reaches into the engine beyond the
`EngineClient` protocol (`model_info`, `tokenizer`, `in_flight`, `generate`, `abort`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.requests import Request

from server.api.encoder import ResponseEncoder
from server.api.errors import bad_request, model_not_found, truncate
from server.api.generation import GenerationStream
from server.api.inflight import InflightGenerations
from server.api.limits import Limits
from server.api.reasoning import REASONING_PARSERS
from server.api.sampling import build_sampling_params
from server.api.tokenizing import Tokenizing
from server.api.tool_parsers import TOOL_PARSERS
from server.api.tokens import TokenText
from server.config import ServerConfig
from server.engine.request import EngineRequest, SamplingParams
from server.engine.structured.spec import StructuredSpec, StructuredSpecError


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
        self._grammars: Any = None  # GrammarCache, made on the first structured request
        self.generations = InflightGenerations()  # what a drain past its deadline ends (server/serve.py)

    def close(self) -> None:
        self.tokens.close()
        self.encoder.close()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        return build_sampling_params(self.limits.vocab_size, **kwargs)

    # -- structured outputs -----------------------------------------------------------------
    def compile_structured(self, spec: StructuredSpec, gate: tuple[int, ...] = ()) -> Any:
        """The spec's compiled grammar (cached; call on the tokenizer thread): a 400 naming the
        parameter when it does not compile."""
        if self._grammars is None:
            from server.engine.structured.backend import GrammarCompiler
            from server.engine.structured.cache import GrammarCache

            self._grammars = GrammarCache(GrammarCompiler(self.tokens.tokenizer, self.limits.vocab_size,
                                                          tuple(getattr(self.engine.model_info, "eos_token_ids", ()))))
        try:
            compiled = self._grammars.get(spec)
        except StructuredSpecError as e:
            raise bad_request(truncate(e.message, 400), param=e.param) from None
        return compiled.with_gate(gate) if gate else compiled

    @property
    def grammar_cache(self) -> Any:
        return self._grammars

    async def start_generation(self, request: Request, requests: list[EngineRequest],
                               stream: bool) -> GenerationStream:
        """Submit and wait for the first outputs (the engine refuses what it cannot queue: 429).
        While waiting, a disconnect aborts."""
        gen = GenerationStream(self.engine, requests, self.config.request_timeout, receive=request.receive,
                               registry=self.generations)
        await gen.start()
        if stream:
            gen.stop_watching_disconnect()
        return gen
