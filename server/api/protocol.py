"""Request bodies of the OpenAI-compatible API (pydantic v2), shared by the endpoints.

Bodies are validated strictly (no string-to-number coercion) and reject unknown fields, as
OpenAI does. Ranges are checked by `SamplingParams` (one source of truth); the serving layer
turns its `SamplingParamsError` into a 400 naming the parameter. Responses are plain dicts
built in the endpoint modules (`completions.py`, `chat.py`).
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

Prompt = Union[str, list[str], list[int], list[list[int]]]
Stop = Union[str, list[str]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage on every chunk


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
    type: str
    json_schema: dict[str, Any] | None = None


class _VLLMSampling(_Body):
    """vLLM's extra sampling fields, accepted in both completion bodies under vLLM's names."""

    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: int | None = None
    priority: int | None = None
    # moe-serve extension: per-token expert ids in `choices[i].routing`
    return_routing: bool | None = None
    # structured outputs (OpenAI's response_format is in each body; vLLM's fields here)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted; this server always uses xgrammar


class CompletionRequest(_VLLMSampling):
    model: str | None = None
    prompt: Prompt
    suffix: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    best_of: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    stop: Stop | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class ChatCompletionRequest(_VLLMSampling):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    stop: Stop | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra template variables (enable_thinking)


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
