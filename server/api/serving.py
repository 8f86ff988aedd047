"""The serving layer: model name, tokenization, chat template, limits -> EngineRequests.

Endpoints call into one `Serving` per app (on `app.state.serving`); it never reaches into the
engine beyond the `EngineClient` protocol (`model_info`, `tokenizer`, `generate`, `abort`,
`num_unfinished_requests`).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from server.api import chat_messages
from server.api.errors import APIError, bad_request, model_not_found, overloaded, truncate
from server.api.generation import GenerationStream
from server.api.grammars import compile_for_request
from server.api.protocol import ChatMessage
from server.api.reasoning import REASONING_PARSERS
from server.api.tool_parsers import TOOL_PARSERS
from server.api.tokens import TokenText
from server.config import ServerConfig
from server.engine.request import MAX_LOGIT_BIAS, EngineRequest, SamplingParams, SamplingParamsError, short_list
from server.engine.structured.service import GrammarService
from server.engine.structured.spec import StructuredSpec
from server.engine.validate import no_room_message, too_long_message

T = TypeVar("T")
# Unicode normalisation can shrink a text (composing characters) before it is split into
# tokens; the character-count bound on tokens allows for up to this factor.
PROMPT_SHRINK = 4
_INT_KEY = re.compile(r" *[+-]?[0-9]{1,20} *")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.engine.served_model_name or engine.model_info.name
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)
        self.created = int(time.time())
        # Tokenization, chat templates and big-body validation run here, off the event loop, so
        # that /health and /metrics answer while a huge prompt is processed. One thread: a
        # tokenizer is not safe to drive from several threads at once.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._backend = self._fast_backend(engine.tokenizer)
        # the longest token's text: a prompt of c characters has at least
        # c / (PROMPT_SHRINK * max_token_chars) tokens (a bound that needs no tokenization)
        vocab = engine.tokenizer.get_vocab() if hasattr(engine.tokenizer, "get_vocab") else {}
        self.max_token_chars = max((len(t) for t in vocab), default=0)
        self.chat_template = chat_messages.load_chat_template(config.chat_template)
        # --tool-call-parser / --reasoning-parser (vLLM's names); parsers are stateless, one each
        self.tool_parser = TOOL_PARSERS[config.tool_call_parser]() if config.tool_call_parser else None
        self.reasoning_parser = REASONING_PARSERS.get(config.engine.reasoning_parser or "")
        # grammar compiles: in processes of their own (started with the first one), cached by bytes
        self.grammars = GrammarService(engine.tokenizer, self.vocab_size,
                                       tuple(getattr(engine.model_info, "eos_token_ids", ())), config.grammar_limits)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the tokenizer thread (its APIError reaches the caller)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.grammars.close()

    @staticmethod
    def _fast_backend(tokenizer: Any) -> Any:
        """The Rust tokenizer behind a fast HF tokenizer, when it encodes exactly as the HF
        wrapper does (checked once): its batch encode releases the GIL and tells the length
        before any Python list of ids is built."""
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is None:
            return None
        probe = "Hello, world!  The list data type\n\tdef f(x): return x ** 2 # é ß 漢字"
        for special in (True, False):
            if backend.encode_batch([probe], add_special_tokens=special)[0].ids != \
                    list(tokenizer.encode(probe, add_special_tokens=special)):
                return None
        return backend

    # -- model ------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_info.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_info.vocab_size)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    # -- prompts ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool, limit: int | None = None, param: str = "prompt") -> list[int]:
        """Token ids of `text`; with `limit`, a text of more tokens raises the context-length 400
        (its ids are never materialised). Call on the tokenizer thread."""
        if self._backend is not None:
            enc = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
            if limit is not None and len(enc) > limit:
                raise self.too_long(len(enc), param)
            return enc.ids
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if limit is not None and len(ids) > limit:
            raise self.too_long(len(ids), param)
        return ids

    def too_long(self, num_tokens: int, param: str = "prompt", at_least: bool = False) -> APIError:
        shown = f"at least {num_tokens}" if at_least else num_tokens
        return APIError(400, no_room_message(self.max_model_len, shown, param), param=param,
                        code="context_length_exceeded")

    def check_text_length(self, text: str, param: str) -> None:
        """Refuse, without tokenizing, a text too long for the context whatever its tokens."""
        if self.max_token_chars:
            at_least = len(text) // (PROMPT_SHRINK * self.max_token_chars)
            if at_least >= self.max_model_len:
                raise self.too_long(at_least, param, at_least=True)

    def check_prompt_count(self, prompt: Any) -> None:
        """Cheap limits on a completion's prompts before any is tokenized: the count one request
        may hold (400) and the engine's free capacity (429)."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            count = len(prompt)
        else:
            count = 1
        cfg = self.config.engine
        most = cfg.max_num_seqs + cfg.max_queue_len
        if count > most:
            raise bad_request(f"prompt: at most {most} prompts per request on this server (--max-num-seqs "
                              f"+ --max-queue-len); this one has {count}", param="prompt")
        self.check_capacity(count)
        for k, item in enumerate(prompt if count > 1 else [prompt]):
            if isinstance(item, str):
                self.check_text_length(item, "prompt" if count == 1 else f"prompt[{k}]")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param}: token ids outside the vocabulary (size {self.vocab_size}): "
                              f"{short_list(bad)}", param=param)

    def completion_prompts(self, prompt: Any) -> list[tuple[list[int], str | None]]:
        """OpenAI's four prompt shapes -> [(token ids, text or None)]."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise bad_request("prompt: must not be empty", param="prompt")
        out: list[tuple[list[int], str | None]] = []
        for k, item in enumerate(items):
            param = "prompt" if len(items) == 1 else f"prompt[{k}]"
            if isinstance(item, str):
                if not item:
                    raise bad_request(f"{param}: must not be empty", param=param)
                ids = self.encode(item, add_special_tokens=True, limit=self.max_model_len - 1, param=param)
                text: str | None = item
            else:
                ids = list(item)
                self.check_token_ids(ids, param)
                text = None
            if not ids:
                raise bad_request(f"{param}: must not be empty", param=param)
            out.append((ids, text))
        return out

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True, **render: Any) -> list[int]:
        """Rendered and tokenized (call on the tokenizer thread)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **render), add_special_tokens=False,
                           limit=self.max_model_len - 1, param="messages")

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        return chat_messages.render(self.tokenizer, messages, add_generation_prompt, tools=tools,
                                    template_kwargs=template_kwargs, chat_template=self.chat_template)

    # -- structured outputs -----------------------------------------------------------------
    async def compile_structured(self, spec: StructuredSpec, request: Request | None = None) -> Any:
        """The spec's compiled grammar (cached; compiled in the compile pool): a 400 naming the
        parameter when it is refused; the wait ends when the request's client disconnects."""
        return await compile_for_request(self.grammars, spec, request.receive if request is not None else None)

    @property
    def grammar_cache(self) -> Any:
        return self.grammars.cache

    # -- limits -----------------------------------------------------------------------------
    def resolve_max_tokens(self, prompt_len: int, requested: int | None, explicit: bool,
                           param: str = "max_tokens", prompt_param: str = "prompt") -> int:
        """`requested` None -> the rest of the context; an implicit default is capped to it."""
        remaining = self.max_model_len - prompt_len
        if remaining < 1:
            raise self.too_long(prompt_len, prompt_param)
        if requested is None:
            return remaining
        if not explicit:
            return min(requested, remaining)
        if requested >= 1 and prompt_len + requested > self.max_model_len:
            raise APIError(400, too_long_message(self.max_model_len, prompt_len, requested, prompt_param, param),
                           param=param, code="context_length_exceeded")
        return requested  # < 1 is rejected by SamplingParams with its own message

    def sampling_params(self, **kwargs: Any) -> SamplingParams:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = self._parse_logit_bias(kwargs["logit_bias"])
        try:
            sp = SamplingParams(**kwargs)
            sp.verify_vocab(self.vocab_size)
        except SamplingParamsError as e:
            raise bad_request(truncate(e.message, 300), param=e.param) from None
        return sp

    def _parse_logit_bias(self, raw: dict[str, Any]) -> dict[int, float]:
        """All bad entries named together: non-integer keys, ids outside the vocabulary,
        values that are not numbers in [-100, 100]."""
        if len(raw) > MAX_LOGIT_BIAS:  # before looking at any entry
            raise bad_request(f"logit_bias: at most {MAX_LOGIT_BIAS} entries; this one has {len(raw)}",
                              param="logit_bias")
        bias: dict[int, float] = {}
        bad: list[str] = []
        for key, value in raw.items():
            if not _INT_KEY.fullmatch(key):
                bad.append(f"{truncate(repr(key), 24)} (not an integer token id)")
                continue
            tid = int(key)
            if not 0 <= tid < self.vocab_size:
                bad.append(f"{truncate(key, 24)} (outside the vocabulary of {self.vocab_size})")
            elif (isinstance(value, bool) or not isinstance(value, (int, float))
                  or not math.isfinite(value) or not -100 <= value <= 100):
                bad.append(f"{truncate(key, 24)} (value must be a number in [-100, 100])")
            else:
                bias[tid] = float(value)
        if bad:
            shown = "; ".join(bad[:8]) + (f"; ... ({len(bad)} in all)" if len(bad) > 8 else "")
            raise bad_request(f"logit_bias: invalid entries: {shown}", param="logit_bias")
        return bias

    # -- running ----------------------------------------------------------------------------
    def check_capacity(self, num_requests: int) -> None:
        cfg = self.config.engine
        try:
            unfinished = int(self.engine.num_unfinished_requests())
        except Exception:
            return
        if unfinished + num_requests > cfg.max_num_seqs + cfg.max_queue_len:
            raise overloaded(f"Too many requests in flight ({unfinished}); the queue limit is "
                             f"{cfg.max_queue_len}. Retry later.")

    async def start_generation(self, request: Request, requests: list[EngineRequest],
                               stream: bool) -> GenerationStream:
        """Submit and wait for the first outputs (the engine refuses what it cannot queue: 429).
        While waiting, a disconnect aborts."""
        gen = GenerationStream(self.engine, requests, self.config.request_timeout, receive=request.receive)
        await gen.start()
        if stream:
            gen.stop_watching_disconnect()
        return gen


def common_sampling_kwargs(body: Any) -> dict[str, Any]:
    """The sampling fields both completion bodies share (OpenAI's and vLLM's names)."""
    return {
        "n": body.n, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
        "stop": body.stop, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "logit_bias": body.logit_bias,
        "top_k": body.top_k, "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
        "min_tokens": body.min_tokens, "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos, "skip_special_tokens": body.skip_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "prompt_logprobs": body.prompt_logprobs,
    }
