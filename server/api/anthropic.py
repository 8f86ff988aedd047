"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat pipeline.

A request is translated into an OpenAI chat body (messages validated as the chat layer's
`ChatMessage`s) and goes through the same plan / grammar / template / generation steps as
/v1/chat/completions (server/api/chat_setup.py); its output (server/api/chat_output.py) becomes
Anthropic content blocks: `thinking` (the reasoning parser's part), `text`, `tool_use`.

- `system` (a string or text blocks, plus any `system` turns inside `messages`) becomes one
  leading system message; Claude Code's `x-anthropic-billing-header: ...` block is dropped (it is
  metadata, and it changes per client version, which would defeat prefix caching);
- user `tool_result` blocks become `tool` messages, assistant `tool_use` blocks `tool_calls`,
  `thinking` blocks the assistant message's reasoning, `redacted_thinking` blocks are dropped;
- `tool_choice`: auto (the default with tools) -> the `--tool-call-parser`, or the text as
  content without one; any -> OpenAI's `required`, tool -> a named choice (both enforced by the
  tool-call grammar, so the call is well-formed); none -> no calls;
- `thinking` enabled / adaptive / between_tools -> `chat_template_kwargs.enable_thinking: true`, disabled or absent
  (Anthropic's default) -> false, for templates that read it (Qwen3); the reasoning parser
  (`--reasoning-parser`) splits the output into thinking and text (a model that always thinks,
  e.g. DeepSeek-R1, still answers with a thinking block). A forced tool choice with thinking is a
  400, as on Anthropic's API;
- `output_config.format` (json_schema) -> structured output through the grammar layer;
- `max_tokens` is capped to the room left in the context (Anthropic's clients send their
  model's output limit, e.g. 32000, whatever the prompt).
Errors are Anthropic's `{"type": "error", "error": {"type", "message"}}` with the usual status
codes (server/api/errors.py `anthropic_error_body`); a failure mid-stream is an `error` event.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.api.anthropic_protocol import (
    AnthropicCountTokensRequest,
    AnthropicErrorResponse,
    AnthropicMessage,
    AnthropicMessagesRequest,
    AnthropicTokenCount,
)
from server.api.body import openapi_body, read_json
from server.api.chat_output import ChoiceOutput
from server.api.chat_setup import choice_output, plan_chat, prepare_chat
from server.api.context import request_log
from server.api.errors import (
    APIError,
    ClientDisconnected,
    anthropic_error_body,
    bad_request,
    internal_error,
    validation_error,
)
from server.api.generation import GenerationStream
from server.api.protocol import ChatCompletionRequest, ChatMessage
from server.api.serving import Serving
from server.api.sse import SSE_HEADERS
from server.engine.request import EngineRequest

logger = logging.getLogger(__name__)
router = APIRouter()

BILLING_HEADER = "x-anthropic-billing-header:"
_MESSAGES = TypeAdapter(list[ChatMessage])
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def _error_responses() -> dict[int | str, dict[str, Any]]:
    statuses = {400: "Invalid request", 401: "Missing or wrong API key (x-api-key or bearer)",
                404: "Unknown model or route", 408: "Request body not received in time",
                413: "Request body too large", 415: "Body is not JSON", 429: "Too many requests",
                500: "Server bug", 503: "Engine unavailable or overloaded", 504: "Request timed out"}
    return {s: {"model": AnthropicErrorResponse, "description": d} for s, d in statuses.items()}


# -- the request -> an OpenAI chat body ----------------------------------------------------------
def _texts(blocks: Any) -> list[str]:
    return [blocks] if isinstance(blocks, str) else [b.text for b in blocks]


def _note_ignored(request: Request, body: Any) -> None:
    """Fields that do not change what this server generates: accepted, each logged once."""
    state = request.app.state
    seen: set[str] | None = getattr(state, "anthropic_ignored_logged", None)
    if seen is None:
        seen = state.anthropic_ignored_logged = set()
    found = [f for f in ("metadata", "service_tier", "context_management", "cache_control", "inference_geo",
                         "speed", "diagnostics", "user_profile_id", "workspace_id")
             if getattr(body, f, None) is not None]
    if body.output_config is not None and body.output_config.effort is not None:
        found.append("output_config.effort")
    if body.thinking is not None:
        found += [f"thinking.{f}" for f in ("budget_tokens", "display") if getattr(body.thinking, f, None) is not None]
    for t in body.tools or []:
        found += [f"tools[].{f}" for f in ("cache_control", "defer_loading", "strict", "eager_input_streaming",
                                           "input_examples") if getattr(t, f) is not None]
    blocks = [b for m in body.messages if not isinstance(m.content, str) for b in m.content]
    blocks += [] if body.system is None or isinstance(body.system, str) else list(body.system)
    for b in blocks:
        found += [f"{b.type}.{f}" for f in ("cache_control", "citations", "signature")
                  if getattr(b, f, None) is not None]
        if b.type == "redacted_thinking":
            found.append("redacted_thinking blocks")
    new = sorted(set(found) - seen)
    if new:
        seen.update(new)
        logger.info("/v1/messages: accepted and ignored (they do not change the output here; logged once): %s",
                    ", ".join(new))


def _messages(body: Any) -> list[dict[str, Any]]:
    if body.messages[-1].role == "assistant":
        raise bad_request(f"messages[{len(body.messages) - 1}]: a final assistant message (a prefill the answer "
                          f"would continue) is not supported; end with a user message",
                          param=f"messages[{len(body.messages) - 1}]")
    system = [t for t in _texts(body.system)] if body.system is not None else []
    out: list[dict[str, Any]] = []
    for m in body.messages:
        if m.role == "system":
            system += _texts(m.content)
        elif isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            parts: list[dict[str, Any]] = []
            for b in m.content:
                if b.type == "tool_result":
                    if parts:  # text before a tool result: its own user turn
                        out.append({"role": "user", "content": parts})
                        parts = []
                    text = "\n".join(_texts(b.content)) if b.content is not None else ""
                    out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": text})
                else:
                    parts.append({"type": "text", "text": b.text})
            if parts or not m.content:
                out.append({"role": "user", "content": parts or ""})
        else:  # assistant
            msg: dict[str, Any] = {"role": "assistant"}
            texts = [{"type": "text", "text": b.text} for b in m.content if b.type == "text"]
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in m.content if b.type == "tool_use"]
            thinking = [b.thinking for b in m.content if b.type == "thinking"]
            msg["content"] = texts or (None if calls else "")
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning"] = "".join(thinking)
            out.append(msg)
    system = [t for t in system if not t.startswith(BILLING_HEADER)]
    if system:
        out.insert(0, {"role": "system", "content": "\n".join(system)})
    return out


def _tool_choice(body: Any) -> tuple[Any, bool | None]:
    """(OpenAI's tool_choice, parallel_tool_calls)."""
    choice = body.tool_choice
    if choice is None:
        return None, None
    parallel = False if getattr(choice, "disable_parallel_tool_use", None) else None
    if choice.type in ("auto", "none"):
        return (choice.type if body.tools else None), parallel
    if not body.tools:
        raise bad_request(f"tool_choice: type '{choice.type}' needs a non-empty tools list", param="tool_choice")
    if body.thinking is not None and body.thinking.type != "disabled":
        raise bad_request("thinking: may not be enabled when tool_choice forces tool use", param="thinking")
    if choice.type == "any":
        return "required", parallel
    return {"type": "function", "function": {"name": choice.name}}, parallel


def to_chat_body(body: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> ChatCompletionRequest:
    try:
        messages = _MESSAGES.validate_python(_messages(body))
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None
    fields: dict[str, Any] = {"messages": messages}
    if body.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema.model_dump(),
            **({"description": t.description} if t.description is not None else {})}} for t in body.tools]
    choice, parallel = _tool_choice(body)
    if choice is not None:
        fields["tool_choice"] = choice
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel
    kwargs = dict(body.chat_template_kwargs or {})
    kwargs.setdefault("enable_thinking", body.thinking is not None and body.thinking.type != "disabled")
    if kwargs:
        fields["chat_template_kwargs"] = kwargs
    if body.output_config is not None and body.output_config.format is not None:
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": body.output_config.format.schema_}}
    if isinstance(body, AnthropicMessagesRequest):
        fields.update({k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                         ("top_k", body.top_k), ("stop", body.stop_sequences)) if v is not None})
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None


def _anthropic_error(err: APIError) -> JSONResponse:
    # the chat layer names OpenAI's fields; a tool's schema is its input_schema here
    err.message = err.message.replace(".function.parameters", ".input_schema")
    return JSONResponse(anthropic_error_body(err), status_code=err.status, headers=err.headers)


def _summary(body: AnthropicMessagesRequest) -> str:
    """One log line per request: what the client sent (Claude Code's requests, in the server log)."""
    fields = sorted(k for k in body.model_fields_set if k not in ("messages", "model"))
    roles = "".join(m.role[0] for m in body.messages)
    blocks = sorted({b.type for m in body.messages if not isinstance(m.content, str) for b in m.content})
    return (f"model={body.model} messages={len(body.messages)}({roles}) blocks={','.join(blocks) or '-'} "
            f"tools={len(body.tools or [])} tool_choice={body.tool_choice.type if body.tool_choice else '-'} "
            f"thinking={body.thinking.type if body.thinking else '-'} max_tokens={body.max_tokens} "
            f"stream={bool(body.stream)} fields={','.join(fields)}")


def install_openapi(app: Any) -> None:
    """/openapi.json states the one model name the Anthropic routes accept (the served one): a
    generated client or a fuzzer sends a name that works, any other is a 404."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        name = app.state.serving.model_name
        for model in (AnthropicMessagesRequest, AnthropicCountTokensRequest):
            props = schema["components"]["schemas"][model.__name__]["properties"]
            props["model"] = {"type": "string", "enum": [name], "title": "Model",
                              "description": "The served model's name (GET /v1/models)."}
        return schema

    app.openapi = openapi


# -- routes ------------------------------------------------------------------------------------
@router.post("/v1/messages", openapi_extra=openapi_body(AnthropicMessagesRequest), response_model=None,
             responses={200: {"model": AnthropicMessage, "description": (
                 "An Anthropic `message`; with `stream: true` a `text/event-stream` of Anthropic's events "
                 "(message_start, ping, content_block_start/delta/stop, message_delta, message_stop; `error` "
                 "on failure)."), "content": {"text/event-stream": {}}}, **_error_responses()})
async def create_message(request: Request) -> Response:
    try:
        return await _create_message(request)
    except APIError as e:
        return _anthropic_error(e)


@router.post("/v1/messages/count_tokens", openapi_extra=openapi_body(AnthropicCountTokensRequest),
             response_model=None, responses={200: {"model": AnthropicTokenCount}, **_error_responses()})
async def count_tokens(request: Request) -> Response:
    try:
        body = await read_json(request, AnthropicCountTokensRequest)
        serving: Serving = request.app.state.serving
        serving.check_model(body.model)
        _note_ignored(request, body)
        chat = to_chat_body(body)
        plan = plan_chat(serving, chat)
        prepared = await serving.tokens.run_blocking(prepare_chat, serving, chat, plan, None)
        return JSONResponse({"input_tokens": len(prepared.prompt_ids)})
    except APIError as e:
        return _anthropic_error(e)


async def _create_message(request: Request) -> Response:
    body = await read_json(request, AnthropicMessagesRequest)
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    logger.info("/v1/messages request: %s", _summary(body))
    _note_ignored(request, body)
    chat = to_chat_body(body)
    plan = plan_chat(serving, chat)  # tools, structured output, reasoning: cheap checks first
    serving.limits.check_capacity(1)
    compiled = await serving.compile_structured(plan.spec, request) if plan.spec is not None else None
    prepared = await serving.tokens.run_blocking(prepare_chat, serving, chat, plan, compiled)
    prompt_ids = prepared.prompt_ids
    max_tokens = serving.limits.resolve_max_tokens(len(prompt_ids), body.max_tokens, explicit=False,
                                                   param="max_tokens", prompt_param="messages")
    sp = serving.sampling_params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 top_k=body.top_k, stop=body.stop_sequences, **plan.sampling_overrides(chat))
    message_id = "msg_" + uuid.uuid4().hex
    log = request_log(request)
    log.request_id = message_id
    log.prompt_tokens = len(prompt_ids)
    engine_request = EngineRequest(request_id=message_id, prompt_token_ids=prompt_ids, sampling_params=sp,
                                   structured=prepared.structured)
    gen = await serving.start_generation(request, [engine_request], stream=bool(body.stream))
    output = choice_output(plan, prepared)
    base = {"id": message_id, "type": "message", "role": "assistant", "model": serving.model_name}
    headers = {"X-Request-Id": message_id}
    if body.stream:
        events = _stream(gen, output, base, len(prompt_ids), log)
        return StreamingResponse(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    try:
        text, tokens, reason, stop_str = "", 0, None, None
        async for _, out in gen:
            for o in out.outputs:
                text += o.text
                tokens += len(o.token_ids)
                if o.finish_reason is not None:
                    reason, stop_str = o.finish_reason, o.stop_reason
    finally:
        await gen.close()
    log.completion_tokens = tokens
    msg, called = output.message(text)
    content = _blocks(msg)
    stop_reason, stop_sequence = _stop(reason, stop_str, called)
    answer = AnthropicMessage.model_validate({**base, "content": content, "stop_reason": stop_reason,
                                              "stop_sequence": stop_sequence, "usage": {
                                                  "input_tokens": len(prompt_ids), "output_tokens": tokens}})
    return JSONResponse(answer.model_dump(), headers=headers)


def _reasoning(d: dict[str, Any]) -> str | None:
    return d.get("reasoning", d.get("reasoning_content"))


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:  # cut by max_tokens: not JSON yet
        return {}
    return value if isinstance(value, dict) else {}


def _blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = _reasoning(msg)
    if reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if msg.get("content"):
        blocks.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": _input(call["function"]["arguments"])})
    return blocks


def _stop(reason: str | None, stop_str: Any, called: bool) -> tuple[str | None, str | None]:
    if reason == "stop" and called:
        return "tool_use", None
    if reason == "stop" and isinstance(stop_str, str):
        return "stop_sequence", stop_str
    return _STOP_REASONS.get(reason or "stop", "end_turn"), None


# -- streaming ---------------------------------------------------------------------------------
def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class _Blocks:
    """The open content block of a stream: a delta of another kind closes it and opens the next."""

    def __init__(self) -> None:
        self.kind: str | None = None  # thinking | text | tool_use
        self.index = -1
        self.tool = -1  # the OpenAI tool-call index of the open tool_use block

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def open(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        events = self.close()
        self.kind, self.index = kind, self.index + 1
        events.append(_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": block}))
        return events

    def delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def feed(self, d: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        reasoning = _reasoning(d)
        if reasoning:
            if self.kind != "thinking":
                events += self.open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self.delta({"type": "thinking_delta", "thinking": reasoning}))
        if d.get("content"):
            if self.kind != "text":
                events += self.open("text", {"type": "text", "text": ""})
            events.append(self.delta({"type": "text_delta", "text": d["content"]}))
        for call in d.get("tool_calls") or []:
            fn = call.get("function") or {}
            if "id" in call:
                events += self.open("tool_use", {"type": "tool_use", "id": call["id"], "name": fn.get("name", ""),
                                                 "input": {}})
                self.tool = call["index"]
            if fn.get("arguments") and self.kind == "tool_use" and call["index"] == self.tool:
                events.append(self.delta({"type": "input_json_delta", "partial_json": fn["arguments"]}))
        return events


async def _stream(gen: GenerationStream, output: ChoiceOutput, base: dict[str, Any], prompt_tokens: int,
                  log: Any) -> AsyncIterator[bytes]:
    tokens = 0
    try:
        yield _event("message_start", {"type": "message_start", "message": {
            **base, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
        yield _event("ping", {"type": "ping"})
        blocks = _Blocks()
        reason, stop_str, called = None, None, False
        async for _, out in gen:
            for o in out.outputs:
                tokens += len(o.token_ids)
                d = output.feed(o.text, final=o.finish_reason is not None)
                called = called or bool(d.get("tool_calls"))
                for e in blocks.feed(d):
                    yield e
                if o.finish_reason is not None:
                    reason, stop_str = o.finish_reason, o.stop_reason
        for e in blocks.close():
            yield e
        stop_reason, stop_sequence = _stop(reason, stop_str, called)
        yield _event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": {"input_tokens": prompt_tokens, "output_tokens": tokens}})
        yield _event("message_stop", {"type": "message_stop"})
    except APIError as e:
        log.stream_error = e.status
        yield _event("error", anthropic_error_body(e))
    except ClientDisconnected:
        log.stream_error = 499
    except Exception:  # our bug: reported in-band, the server keeps serving
        logger.exception("error while streaming /v1/messages")
        err = internal_error()
        log.stream_error = err.status
        yield _event("error", anthropic_error_body(err))
    finally:
        log.completion_tokens = tokens
        await gen.close()
