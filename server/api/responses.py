"""Response bodies of the OpenAI-compatible API (pydantic v2): what /openapi.json documents.

Endpoints build these models with exactly the fields they send and serialize them with
`dump(...)` (`exclude_unset`): a field that was never set is left out, a field set to None
is sent as null, as OpenAI does (clients rely on some nulls, e.g. `logprobs`,
`finish_reason`). Optional extension fields (routing, prompt_logprobs, reasoning,
tool_calls, usage on stream chunks) therefore default to None in the schema and appear only
when the request asked for them. `prompt_logprobs`, which can be large and are plain JSON when
built, are put into the dumped dict past validation (server/api/completions.py, chat.py); the
models still document them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

RoutingIds = list[list[list[int]]]  # [tokens, moe_layers, top_k] expert ids
RoutingWeights = list[list[list[float]]]  # [tokens, moe_layers, top_k] router weights


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON-able dict of a response model: unset fields left out, None sent as null."""
    return model.model_dump(exclude_unset=True)


# -- usage ----------------------------------------------------------------------------------
class MoEUsage(_Out):
    """`usage.moe`: how the request used the experts (server/metrics/usage.py)."""

    expert_assignments: int
    distinct_experts_per_layer: list[int]
    routing_entropy_bits: float
    max_routing_entropy_bits: float
    device_share: dict[str, float]
    dropped_assignments: Optional[int] = None  # only with an expert capacity
    zero_expert_assignments: Optional[int] = None  # only for models with zero-computation experts


class PromptTokensDetails(_Out):
    cached_tokens: int  # prompt tokens served from the prefix cache


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None  # once the requests finished
    moe: Optional[MoEUsage] = None  # once the request finished, when the engine observed routing


# -- logprobs -------------------------------------------------------------------------------
class LegacyLogprobs(_Out):
    """Completions' `logprobs` object."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: Optional[list[ChatLogprob]]


class PromptLogprob(_Out):
    """vLLM's per prompt token entry: {token_id: {logprob, rank?, decoded_token}}."""

    logprob: float
    rank: Optional[int] = None  # the alternatives' rank (absent for the prompt's own token)
    decoded_token: str


PromptLogprobs = Optional[list[Optional[dict[str, PromptLogprob]]]]


# -- completions ----------------------------------------------------------------------------
class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[LegacyLogprobs]
    finish_reason: Optional[str]
    prompt_logprobs: PromptLogprobs = None  # when prompt_logprobs was asked
    routing: Optional[RoutingIds] = None  # when return_routing was asked
    routing_weights: Optional[RoutingWeights] = None
    prompt_routing: Optional[RoutingIds] = None
    prompt_routing_weights: Optional[RoutingWeights] = None


class _Envelope(_Out):
    id: str
    object: str  # a Literal in each subclass
    created: int
    model: str


class Completion(_Envelope):
    """A whole completion, and (with `stream: true`) each chunk of one."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None  # always set on whole responses; stream_options decide on chunks


# -- chat -----------------------------------------------------------------------------------
class FunctionCall(_Out):
    name: str
    arguments: str


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(_Out):
    """A streamed piece of a tool call: the first carries id, type and name."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[dict[str, str]] = None  # name and/or an arguments fragment


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: Optional[str]
    reasoning: Optional[str] = None  # with --reasoning-parser (vLLM's name)
    reasoning_content: Optional[str] = None  # the same, with --legacy-reasoning-content (the older name)
    tool_calls: Optional[list[ToolCall]] = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]
    routing: Optional[RoutingIds] = None
    routing_weights: Optional[RoutingWeights] = None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs = None  # when prompt_logprobs was asked
    prompt_routing: Optional[RoutingIds] = None  # when return_routing was asked
    prompt_routing_weights: Optional[RoutingWeights] = None


class ChatDelta(_Out):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning: Optional[str] = None
    reasoning_content: Optional[str] = None  # with --legacy-reasoning-content
    tool_calls: Optional[list[ToolCallDelta]] = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]
    routing: Optional[RoutingIds] = None  # the new tokens' (when return_routing was asked)
    routing_weights: Optional[RoutingWeights] = None


class ChatCompletionChunk(ChatCompletion):
    """One event of a streamed chat completion (the prompt fields come with the first)."""

    object: Literal["chat.completion.chunk"]  # type: ignore[assignment]
    choices: list[ChatChunkChoice]  # type: ignore[assignment]
    usage: Optional[Usage] = None  # type: ignore[assignment]  # stream_options.include_usage


# -- models, tokens, errors -----------------------------------------------------------------
class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: Optional[str]
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None  # when return_token_strs was asked


class DetokenizeResponse(_Out):
    prompt: str


class ErrorDetail(_Out):
    message: str
    type: str
    param: Optional[str]
    code: Union[int, str, None]


class ErrorResponse(_Out):
    error: ErrorDetail


_ERROR_STATUSES = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model or route",
                   408: "Request body not received in time", 413: "Request body too large",
                   415: "Body is not JSON", 429: "Too many requests",
                   500: "Server bug", 503: "Engine unavailable or overloaded", 504: "Request timed out"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_STATUSES.items()}


def generation_responses(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a generation route: JSON, or with `stream: true` an SSE stream of `chunk`s."""
    return {200: {"model": model, "description": (
        f"A {model.__name__}; with `stream: true` a `text/event-stream` of `data: <{chunk.__name__}>` "
        "events, an in-band `data: <ErrorResponse>` on failure, then `data: [DONE]`."),
        "content": {"text/event-stream": {}}}, **ERROR_RESPONSES}
