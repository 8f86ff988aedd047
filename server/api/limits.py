"""What one request may ask of the model and the engine, checked before and after tokenizing:
context length, prompt count, token ids, the engine's free capacity, max_tokens.

All failures are the API's errors (400 naming the parameter, 429 from the engine's admission
rule: server/engine/admission.py), raised where they are found.
"""

from __future__ import annotations

from typing import Any

from server.api.errors import APIError, bad_request, overloaded
from server.engine.protocol import EngineOverloadedError
from server.engine.request import short_list
from server.engine.validate import no_room_message, too_long_message

# Unicode normalisation can shrink a text (composing characters) before it is split into
# tokens; the character-count bound on tokens allows for up to this factor.
PROMPT_SHRINK = 4


class Limits:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        # the longest token's text: a prompt of c characters has at least
        # c / (PROMPT_SHRINK * max_token_chars) tokens (a bound that needs no tokenization)
        tokenizer = engine.tokenizer
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self.max_token_chars = max((len(t) for t in vocab), default=0)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_info.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_info.vocab_size)

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

    def check_capacity(self, num_requests: int) -> None:
        """The engine's admission rule (server/engine/admission.py), asked before tokenizing."""
        try:
            self.engine.in_flight.check(num_requests)
        except EngineOverloadedError as e:
            raise overloaded(str(e)) from None

    def check_prompt_count(self, prompt: Any) -> None:
        """Cheap limits on a completion's prompts before any is tokenized: the count one request
        may hold (400), the engine's free capacity (429) and each text's length."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            count = len(prompt)
        else:
            count = 1
        most = self.engine.in_flight.limit
        if count > most:
            raise bad_request(f"prompt: at most {most} prompts per request on this server (--max-num-seqs "
                              f"+ --max-queue-len); this one has {count}", param="prompt")
        self.check_capacity(count)
        for k, item in enumerate(prompt if count > 1 else [prompt]):
            if isinstance(item, str):
                self.check_text_length(item, "prompt" if count == 1 else f"prompt[{k}]")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param}: token ids outside the vocabulary (size {self.vocab_size}): "
                              f"{short_list(bad)}", param=param)

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
