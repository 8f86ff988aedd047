"""Tokenization and chat templates, off the event loop.

One worker thread (a tokenizer is not safe to drive from several threads at once) runs
tokenization, chat templates and big-body validation, so that /health and /metrics answer while
a huge prompt is processed (`run_blocking`). `encode` uses the Rust tokenizer's batch encode where
it encodes exactly as the HF wrapper (checked once): it releases the GIL and tells a text's length
before any Python list of ids is built, so a prompt too long for the context is refused without
materialising its ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from server.api import chat_messages
from server.api.errors import bad_request
from server.api.limits import Limits
from server.api.protocol import ChatMessage

T = TypeVar("T")


class Tokenizing:
    def __init__(self, tokenizer: Any, limits: Limits, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.chat_template = chat_messages.load_chat_template(chat_template)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._backend = self._fast_backend(tokenizer)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the tokenizer thread (its APIError reaches the caller)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _fast_backend(tokenizer: Any) -> Any:
        """The Rust tokenizer behind a fast HF tokenizer, when it encodes exactly as the HF
        wrapper does (checked once)."""
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is None:
            return None
        probe = "Hello, world!  The list data type\n\tdef f(x): return x ** 2 # é ß 漢字"
        for special in (True, False):
            if backend.encode_batch([probe], add_special_tokens=special)[0].ids != \
                    list(tokenizer.encode(probe, add_special_tokens=special)):
                return None
        return backend

    # -- the calls below run on the tokenizer thread ------------------------------------------
    def encode(self, text: str, add_special_tokens: bool, limit: int | None = None, param: str = "prompt") -> list[int]:
        """Token ids of `text`; with `limit`, a text of more tokens raises the context-length 400
        (its ids are never materialised)."""
        if self._backend is not None:
            enc = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
            if limit is not None and len(enc) > limit:
                raise self.limits.too_long(len(enc), param)
            return enc.ids
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if limit is not None and len(ids) > limit:
            raise self.limits.too_long(len(ids), param)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        return chat_messages.render(self.tokenizer, messages, add_generation_prompt, tools=tools,
                                    template_kwargs=template_kwargs, chat_template=self.chat_template)

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
                ids = self.encode(item, add_special_tokens=True, limit=self.limits.max_model_len - 1, param=param)
                text: str | None = item
            else:
                ids = list(item)
                self.limits.check_token_ids(ids, param)
                text = None
            if not ids:
                raise bad_request(f"{param}: must not be empty", param=param)
            out.append((ids, text))
        return out
