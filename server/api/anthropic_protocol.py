"""Request and response bodies of the Anthropic Messages API (`POST /v1/messages`,
`POST /v1/messages/count_tokens`), pydantic v2, strict like the OpenAI bodies (protocol.py).

Content blocks and messages are discriminated unions (on `type`, on `role`), so /openapi.json
states exactly what is accepted: text, tool_use, tool_result, thinking and redacted_thinking
blocks. Image and document blocks are not in the schema: no served model takes them, and the
400 names the block type. Fields that Anthropic clients send and that do not change what this
server generates (`metadata`, `context_management`, `service_tier`, `cache_control`, `speed`,
`inference_geo`, `diagnostics`, `user_profile_id`, `workspace_id`,
`citations`, a thinking block's `signature`, `output_config.effort`, `thinking.budget_tokens`,
`thinking.display`, a tool's `defer_loading` / `strict` / `eager_input_streaming` /
`input_examples`) are accepted and ignored (logged once per field: server/api/anthropic.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol import REQUEST_MODELS, StopString
from server.engine.request import MAX_STOP

CacheControl = dict[str, Any] | None  # {"type": "ephemeral", "ttl"?}: accepted, ignored


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- content blocks -------------------------------------------------------------------------
class TextBlock(_Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl = None
    citations: list[dict[str, Any]] | None = None  # accepted, ignored


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    input: dict[str, Any]
    cache_control: CacheControl = None


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl = None


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # accepted, ignored (nothing is signed here)
    cache_control: CacheControl = None


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]
    data: str  # opaque: dropped from the prompt


UserBlock = Annotated[TextBlock | ToolResultBlock, Field(discriminator="type")]
AssistantBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock | RedactedThinkingBlock,
                           Field(discriminator="type")]


class UserMessage(_Body):
    role: Literal["user"]
    content: str | list[UserBlock]


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | list[AssistantBlock]


class SystemMessage(_Body):
    """A system message inside `messages` (Claude Code sends them): rendered as a system turn."""

    role: Literal["system"]
    content: str | list[TextBlock]


Message = Annotated[UserMessage | AssistantMessage | SystemMessage, Field(discriminator="role")]


# -- tools ----------------------------------------------------------------------------------
class InputSchema(BaseModel):
    """A JSON schema of type object (a tool's arguments); its other keywords are free."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["object"]


class Tool(_Body):
    type: Literal["custom"] | None = None
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    input_schema: InputSchema
    cache_control: CacheControl = None
    # accepted, ignored: they change how Anthropic's service loads or streams tools, not the output here
    defer_loading: bool | None = None
    strict: bool | None = None
    eager_input_streaming: bool | None = None
    input_examples: list[dict[str, Any]] | None = None


class ToolChoiceAuto(_Body):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Body):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Body):
    type: Literal["tool"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Body):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
                       Field(discriminator="type")]


# -- thinking and output ------------------------------------------------------------------------
class ThinkingEnabled(_Body):
    type: Literal["enabled"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None  # accepted, not enforced
    display: str | None = None  # accepted, ignored


class ThinkingAdaptive(_Body):
    type: Literal["adaptive"]
    display: str | None = None  # accepted, ignored


class ThinkingDisabled(_Body):
    type: Literal["disabled"]


class ThinkingBetweenTools(_Body):
    type: Literal["between_tools"]


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled | ThinkingBetweenTools,
                     Field(discriminator="type")]


class JsonOutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # accepted, ignored
    format: JsonOutputFormat | None = None  # structured output: the grammar layer enforces it


SystemPrompt = str | list[TextBlock]


class _MessagesBase(_Body):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    system: SystemPrompt | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # vLLM's extension: extra chat template variables
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted, ignored
    context_management: dict[str, Any] | None = None


class AnthropicMessagesRequest(_MessagesBase):
    max_tokens: Annotated[int, Field(ge=1)]
    stream: bool | None = None
    stop_sequences: Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # 0: disabled
    # accepted, ignored
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    cache_control: CacheControl = None
    inference_geo: str | None = None
    speed: Literal["standard", "fast"] | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class AnthropicCountTokensRequest(_MessagesBase):
    pass


REQUEST_MODELS.update({m.__name__: m for m in (AnthropicMessagesRequest, AnthropicCountTokensRequest)})


# -- responses ----------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutTextBlock(_Out):
    type: Literal["text"]
    text: str


class OutThinkingBlock(_Out):
    type: Literal["thinking"]
    thinking: str
    signature: str


class OutToolUseBlock(_Out):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(_Out):
    input_tokens: int
    output_tokens: int


class AnthropicMessage(_Out):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[OutTextBlock | OutThinkingBlock | OutToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicTokenCount(_Out):
    input_tokens: int


class AnthropicErrorDetail(_Out):
    type: str
    message: str


class AnthropicErrorResponse(_Out):
    type: Literal["error"]
    error: AnthropicErrorDetail
