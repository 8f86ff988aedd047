"""Request and response bodies of the OpenAI Responses API (`/v1/responses`), pydantic v2.

Requests are validated strictly and reject unknown fields (as the chat body does). Input items
and content parts are tagged unions, so /openapi.json states exactly what is accepted; `tools`
and `tool_choice` are checked by server/api/responses_api/convert.py (its messages name the
refused tool types) and their accepted shapes are stated in the schema. Fields that clients send
by default and that do not change the output are accepted and ignored (README: "OpenAI Responses
API"): `prompt_cache_key`, `prompt_cache_retention`, `safety_identifier`, `service_tier`,
`user`, `client_metadata`, `stream_options`, `background: false`, `include:
["reasoning.encrypted_content"]`, `reasoning.summary`, `text.verbosity`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

MAX_METADATA = 16
MAX_INPUT_ITEMS = 4096
NAME_PATTERN = "^[A-Za-z0-9_.-]{1,64}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- input ----------------------------------------------------------------------------------
class InputText(_Body):
    type: Literal["input_text"]
    text: str


class OutputTextPart(_Body):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = None  # accepted, ignored
    logprobs: list[dict[str, Any]] | None = None  # accepted, ignored


class RefusalPart(_Body):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | OutputTextPart | RefusalPart, Field(discriminator="type")]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(_Body):
    """A message (OpenAI's EasyInputMessage and its input/output message items)."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    arguments: str
    namespace: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None


class SummaryText(_Body):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Body):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Body):
    """Reasoning from an earlier turn: its `content` (else its `summary`) reaches the chat
    template as the next assistant message's `reasoning`; `encrypted_content` is ignored."""

    type: Literal["reasoning"]
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    id: str | None = None
    status: ItemStatus | None = None


def _item_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")] | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_tag)]


# -- tools and options ------------------------------------------------------------------------
_PARAMETERS_SCHEMA = {"anyOf": [{"type": "object", "required": ["type"], "properties": {"type": {"const": "object"}}},
                                {"type": "null"}]}
_FUNCTION_TOOL_SCHEMA = {
    "type": "object", "required": ["type", "name"], "additionalProperties": False,
    "properties": {"type": {"const": "function"}, "name": {"type": "string", "pattern": NAME_PATTERN},
                   "description": {"type": ["string", "null"]}, "parameters": _PARAMETERS_SCHEMA,
                   "strict": {"type": ["boolean", "null"]}}}
TOOLS_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "array", "maxItems": 128, "items": {"oneOf": [
    _FUNCTION_TOOL_SCHEMA,
    {"type": "object", "required": ["type", "name", "tools"], "additionalProperties": False,
     "properties": {"type": {"const": "namespace"}, "name": {"type": "string", "pattern": NAME_PATTERN},
                    "description": {"type": ["string", "null"]},
                    "tools": {"type": "array", "minItems": 1, "items": _FUNCTION_TOOL_SCHEMA}}}]}},
    {"type": "null"}]}
TOOL_CHOICE_SCHEMA: dict[str, Any] = {"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "name"], "additionalProperties": False,
     "properties": {"type": {"const": "function"}, "name": {"type": "string", "pattern": NAME_PATTERN}}},
    {"type": "null"}]}


class FormatText(_Body):
    type: Literal["text"]


class FormatJsonObject(_Body):
    type: Literal["json_object"]


class FormatJsonSchema(_Body):
    type: Literal["json_schema"]
    name: Annotated[str, Field(pattern="^[A-Za-z0-9_-]{1,64}$")]
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Body):
    format: Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, ignored


class ReasoningConfig(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None  # accepted, echoed
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted, echoed
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # deprecated spelling


class StreamOptions(_Body):
    include_obfuscation: bool | None = None  # accepted, ignored: no obfuscation padding is sent


class ResponsesRequest(_Body):
    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra=TOOLS_SCHEMA)
    tool_choice: str | dict[str, Any] | None = Field(None, json_schema_extra=TOOL_CHOICE_SCHEMA)
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    store: bool | None = None  # default true, as OpenAI
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=MAX_METADATA, json_schema_extra={"propertyNames": {"maxLength": 64}})
    truncation: Literal["disabled"] | None = None
    include: list[Literal["reasoning.encrypted_content"]] | None = None
    background: Literal[False] | None = None
    # accepted and ignored (they do not change the output)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    user: str | None = None
    client_metadata: dict[str, Any] | None = None  # Codex CLI


# -- response -------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputText(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]]
    logprobs: list[dict[str, Any]]


class OutputMessage(_Out):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(_Out):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus
    namespace: str | None = None


class OutputReasoning(_Out):
    type: Literal["reasoning"]
    id: str
    summary: list[dict[str, Any]]
    content: list[ReasoningText]
    status: ItemStatus
    encrypted_content: str | None = None


OutputItem = Annotated[OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")]


class InputTokensDetails(_Out):
    cached_tokens: int


class OutputTokensDetails(_Out):
    reasoning_tokens: int


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"]


class ResponseError(_Out):
    code: str
    message: str


class ResponseObject(_Out):
    id: str
    object: Literal["response"]
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    model: str
    instructions: str | None
    output: list[OutputItem]
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    previous_response_id: str | None
    reasoning: dict[str, Any] | None
    text: dict[str, Any]
    truncation: Literal["disabled"]
    metadata: dict[str, str]
    store: bool
    background: bool
    usage: ResponseUsage | None
    user: str | None = None


class DeletedResponse(_Out):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class StreamEvent(_Out):
    """One server-sent event: `event: <type>` and `data: <this object>`; besides `type` and
    `sequence_number` each type carries its own fields (response, item, output_index, item_id,
    content_index, part, delta, text, arguments, name, code, message, param)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int
