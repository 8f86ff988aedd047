"""Request validation against the model, shared by every engine (vLLM's input processor role).

`validate_request` runs once per request, before it is queued: token ids inside the vocabulary,
a non-empty prompt, prompt + max_tokens inside the context, and the engine's own limits when
given (completions per request, routing volume). It returns the effective max_tokens (the rest
of the context when the request left it unset). The context-length messages live here only;
the API's pre-checks (before tokenizing a whole body) use the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.protocol import RequestTooLongError
from server.engine.request import MAX_ROUTING_IDS, EngineRequest, SamplingParamsError, short_list


def no_room_message(max_model_len: int, prompt_len: int | str, prompt_param: str = "prompt") -> str:
    """The prompt alone leaves no token for the completion."""
    return (f"This model's maximum context length is {max_model_len} tokens. However, your {prompt_param} has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please reduce the length of the "
            f"{prompt_param}.")


def too_long_message(max_model_len: int, prompt_len: int, max_tokens: int, prompt_param: str = "prompt",
                     param: str = "max_tokens") -> str:
    """The prompt plus the requested completion exceed the context."""
    return (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, {max_tokens} in the "
            f"completion). Please reduce the length of the {prompt_param} or {param}.")


@dataclass(frozen=True)
class RoutingShape:
    """What one token's routing record holds: ids for `num_moe_layers` x `top_k`."""

    num_moe_layers: int
    top_k: int


def validate_request(request: EngineRequest, vocab_size: int, max_model_len: int, *,
                     max_num_seqs: int | None = None, routing: RoutingShape | None = None) -> int:
    """Raise SamplingParamsError / RequestTooLongError (the API answers 400); return max_tokens."""
    params = request.sampling_params
    params.verify_vocab(vocab_size)
    n_prompt = len(request.prompt_token_ids)
    if n_prompt == 0:
        raise RequestTooLongError("the prompt is empty: at least one token is needed")
    bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise SamplingParamsError("prompt", f"prompt: token ids outside the vocabulary (size {vocab_size}): "
                                            f"{short_list(bad)}")
    if max_num_seqs is not None and params.n > max_num_seqs:
        raise SamplingParamsError("n", f"n: at most {max_num_seqs} completions per request on this server "
                                       f"(--max-num-seqs)")
    if params.max_tokens is None:
        if n_prompt >= max_model_len:
            raise RequestTooLongError(no_room_message(max_model_len, n_prompt))
        max_tokens = max_model_len - n_prompt
    elif n_prompt + params.max_tokens > max_model_len:
        raise RequestTooLongError(too_long_message(max_model_len, n_prompt, params.max_tokens))
    else:
        max_tokens = params.max_tokens
    if request.return_routing and routing is not None:
        ids = (n_prompt + params.n * max_tokens) * routing.num_moe_layers * routing.top_k
        if ids > MAX_ROUTING_IDS:
            raise SamplingParamsError(
                "return_routing", f"return_routing: this request could return {ids} expert ids ((prompt "
                f"{n_prompt} + n {params.n} x max_tokens {max_tokens}) tokens x {routing.num_moe_layers} MoE "
                f"layers x top-{routing.top_k}); the limit is {MAX_ROUTING_IDS}. Lower max_tokens or n.")
    return max_tokens
