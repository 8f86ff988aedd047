"""Request bodies of the OpenAI-compatible API (pydantic v2), shared by the endpoints.

Bodies are validated strictly (no string-to-number coercion) and reject unknown fields, as
OpenAI does. The fields carry the constraints the server enforces (ranges, enums, lengths,
limits: `SamplingParams` checks the same ones for every engine and the offline `LLM`, from
the same constants), so /openapi.json states them; a violation is a 400 naming the parameter
(server/api/errors.py `validation_error`). Constraints that need the model (token ids below
the vocabulary size, context length) or span fields (min_tokens <= max_tokens) are checked by
the serving layer; `json_schema_extra` documents the few it checks itself so that its error
messages can name every bad entry (logit_bias, stop_token_ids). Responses: responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from server.api.prompt_logprobs import MAX_PROMPT_LOGPROB_ENTRIES
from server.engine.request import (
    INT64_MAX,
    INT64_MIN,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
)

Prompt = Union[Annotated[str, Field(min_length=1)], Annotated[list[str], Field(min_length=1)],
               Annotated[list[int], Field(min_length=1)], Annotated[list[list[int]], Field(min_length=1)]]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP)]]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PROMPT_LOGPROBS_LIMIT = (
    f"vLLM's: the top alternatives of each prompt token. An answer holds at most {MAX_PROMPT_LOGPROB_ENTRIES} "
    "prompt logprob entries (a 400 past it): completions send each prompt's in every one of its n choices, "
    "n x prompt tokens x (prompt_logprobs + 1), plus n x prompt tokens x (logprobs + 1) with echo; chat sends "
    "them once, prompt tokens x (prompt_logprobs + 1).")
# logit_bias: {token id (an integer, as a JSON key): bias in [-100, 100]}; the entries are checked
# by the serving layer, which names every bad one in its message
LOGIT_BIAS_SCHEMA: dict[str, Any] = {"propertyNames": {"pattern": "^ *[+-]?[0-9]{1,20} *$"},
                     "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage on every chunk
    include_obfuscation: bool | None = None  # OpenAI's; accepted and ignored (no obfuscation padding is sent)


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of json / regex / choice / grammar / json_object."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema (object or JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (xgrammar's GBNF dialect)
    json_object: bool | None = None
    structural_tag: Any | None = None  # refused: not supported
    disable_any_whitespace: bool | None = None  # JSON: compact (the default here) or free whitespace
    disable_fallback: bool | None = None  # accepted; one backend here, nothing to fall back to
    disable_additional_properties: bool | None = None  # accepted (a guidance-backend option in vLLM)
    whitespace_pattern: str | None = None  # refused when set: not supported by the xgrammar backend


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _GenerationBody(_Body):
    """The fields both completion bodies accept: vLLM's extra sampling fields, then OpenAI's
    (the order pydantic validates in, so the order in which errors are reported)."""

    top_k: Optional[Annotated[int, Field(ge=-1)]] = None  # 0 or -1: disabled
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0.0, le=2.0)]] = None
    min_tokens: Optional[Annotated[int, Field(ge=0)]] = None  # and <= max_tokens
    stop_token_ids: Optional[list[int]] = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                                json_schema_extra={"items": {"type": "integer", "minimum": 0}})
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: Optional[Logprobs] = Field(None, description=PROMPT_LOGPROBS_LIMIT)
    priority: int | None = None
    # moe-serve extension: per-token expert ids in `choices[i].routing`
    return_routing: bool | None = None
    # structured outputs (OpenAI's response_format is below; vLLM's fields here)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted; this server always uses xgrammar
    # OpenAI's
    model: str | None = None
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    n: Optional[Annotated[int, Field(ge=1, le=MAX_N)]] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    logit_bias: Optional[dict[str, Any]] = Field(None, max_length=MAX_LOGIT_BIAS,
                                                 json_schema_extra=LOGIT_BIAS_SCHEMA)
    seed: Optional[Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]] = None
    user: str | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_GenerationBody):
    prompt: Prompt
    suffix: str | None = None  # refused when set: not supported
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = 16
    best_of: Optional[Annotated[int, Field(ge=1, le=MAX_N)]] = None  # must equal n
    logprobs: Optional[Logprobs] = Field(None, description="The top alternatives of each completion token (and, "
                                         "with echo, of each prompt token: those count toward the prompt logprob "
                                         "limit, see prompt_logprobs).")
    echo: bool | None = False


# -- chat messages: one model per role (the `role` discriminates), typed content parts ---------
class TextPart(_Body):
    type: Literal["text"]
    text: str


class RefusalPart(_Body):
    """An assistant's refusal part (OpenAI's); rendered like text."""

    type: Literal["refusal"]
    refusal: str


# Only text parts: image_url / input_audio / file / other part types are refused with a 400
# naming the part type (server/api/errors.py `union_tag_invalid`): no served model takes them.
TextContent = Union[str, list[TextPart]]
AssistantPart = Annotated[Union[TextPart, RefusalPart], Field(discriminator="type")]


class HistoryFunctionCall(_Body):
    name: str
    arguments: Union[str, dict[str, Any]] = Field(
        "{}", description="The arguments as JSON text (OpenAI's), or as an object; JSON text must parse.")


class HistoryToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: HistoryFunctionCall


class SystemMessage(_Body):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Body):
    """OpenAI's `developer` role: rendered as a system message."""

    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Body):
    role: Literal["user"]
    content: TextContent
    name: str | None = None


class AssistantHistoryMessage(_Body):
    """An earlier assistant turn. `reasoning` (vLLM's current name) or `reasoning_content` (the
    older one, DeepSeek's): its thinking, which reaches the template as `reasoning_content`
    (the variable the Qwen3 / GLM / MiniMax / Kimi templates read) and as `reasoning`."""

    role: Literal["assistant"]
    content: Union[str, list[AssistantPart], None] = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[HistoryToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ToolMessage(_Body):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str
    name: str | None = None  # accepted, as vLLM does (some templates render it)


ChatMessage = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantHistoryMessage, ToolMessage],
                        Field(discriminator="role")]
"""One chat message; validate lists with `pydantic.TypeAdapter(list[ChatMessage])`."""
CHAT_ROLE_MODELS = {"system": SystemMessage, "developer": DeveloperMessage, "user": UserMessage,
                    "assistant": AssistantHistoryMessage, "tool": ToolMessage}


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    logprobs: bool | None = False
    top_logprobs: Optional[Logprobs] = None  # needs logprobs: true
    tools: list[dict[str, Any]] | None = None
    # checked by server/api/tools.py (its message names the choices); the schema states them
    tool_choice: str | dict[str, Any] | None = Field(None, json_schema_extra={"anyOf": [
        {"enum": ["none", "auto", "required"]}, {"type": "object"}, {"type": "null"}]})
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra template variables (enable_thinking)
    # reaches the chat template as `reasoning_effort` (as vLLM passes it; gpt-oss's reads it);
    # accepted and ignored (logged once) where the template does not use it
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    # OpenAI fields clients send by default that do not change what is generated: accepted,
    # ignored, each logged once (server/api/ignored.py; README "Chat Completions compatibility")
    metadata: Optional[dict[str, Annotated[str, Field(max_length=512)]]] = Field(None, max_length=16)
    store: bool | None = None
    service_tier: Optional[Literal["auto", "default", "flex", "scale", "priority"]] = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None
    modalities: Optional[list[Literal["text"]]] = None  # text is all the served models write


class TokenizeRequest(_Body):
    """vLLM's /tokenize: either `prompt` or `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(...)


REQUEST_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m for m in (CompletionRequest, ChatCompletionRequest, TokenizeRequest,
                            DetokenizeRequest)
}
