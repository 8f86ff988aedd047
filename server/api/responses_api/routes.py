"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API on the chat
pipeline (server/api/chat_setup.py: tool plan, structured output, reasoning parser, chat
template, then one engine request), with the in-memory store (store.py).

Streaming answers `text/event-stream` events as OpenAI sends them (`event: <type>` and
`data: <json>`, each with `sequence_number`; no `[DONE]`): `response.created`,
`response.in_progress`, the items' events (output.py), then `response.completed` (or
`response.incomplete` when `max_output_tokens` cut the output). A failure after the stream
started is an `error` event followed by `response.failed`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from server.api.body import openapi_body, read_json
from server.api.chat_setup import PreparedChat, choice_output, plan_chat, prepare_chat
from server.api.context import request_log
from server.api.errors import APIError, ClientDisconnected, internal_error, truncate
from server.api.generation import GenerationStream
from server.api.responses import ERROR_RESPONSES
from server.api.responses_api.convert import (
    chat_messages,
    chat_request,
    chat_tool_choice,
    chat_tools,
    input_items,
    rename,
)
from server.api.responses_api.output import (
    EventBuilder,
    items_from_message,
    reasoning_text,
    response_object,
)
from server.api.responses_api.protocol import (
    DeletedResponse,
    ResponseObject,
    ResponsesRequest,
)
from server.api.responses_api.store import ResponseStore
from server.api.sampling import common_sampling_kwargs
from server.api.serving import Serving, new_id
from server.api.sse import SSE_HEADERS
from server.engine.request import EngineRequest, RequestOutput

logger = logging.getLogger(__name__)
router = APIRouter()

_RESPONSES = {200: {"model": ResponseObject, "description": (
    "A response object; with `stream: true` a `text/event-stream` of `event: <type>` / `data: <StreamEvent>` "
    "events ending with response.completed, response.incomplete or response.failed."),
    "content": {"text/event-stream": {}}}, **ERROR_RESPONSES}


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{truncate(response_id, 80)}' not found (it was never stored, was "
                         f"deleted, or expired from this server's response store).", param=param,
                    code="response_not_found")


def get_store(request: Request) -> ResponseStore:
    return request.app.state.responses_store


@router.post("/v1/responses", openapi_extra=openapi_body(ResponsesRequest), response_model=None,
             responses=_RESPONSES)
async def create_response(request: Request) -> Response:
    body = await read_json(request, ResponsesRequest)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("POST /v1/responses request: %s", json.dumps(_summary(body), ensure_ascii=False))
    serving: Serving = request.app.state.serving
    store = get_store(request)
    serving.check_model(body.model)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        prev = store.get(body.previous_response_id)
        if prev is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        history = prev.conversation
    items = history + input_items(body)
    tools, namespaced = chat_tools(body.tools)
    chat_body = chat_request(body, chat_messages(items, body.instructions), tools, chat_tool_choice(body.tool_choice))
    try:
        plan = plan_chat(serving, chat_body)
        serving.limits.check_capacity(1)
        compiled = await serving.compile_structured(plan.spec, request) if plan.spec is not None else None
        prepared: PreparedChat = await serving.tokens.run_blocking(prepare_chat, serving, chat_body, plan, compiled)
        prompt_ids = prepared.prompt_ids
        max_tokens = serving.limits.resolve_max_tokens(len(prompt_ids), body.max_output_tokens, explicit=True,
                                                       param="max_output_tokens", prompt_param="input")
        sp = serving.sampling_params(max_tokens=max_tokens,
                                     **{**common_sampling_kwargs(chat_body), **plan.sampling_overrides(chat_body)})
    except APIError as e:
        raise rename(e) from None
    response_id = new_id("resp").replace("-", "_")
    log = request_log(request)
    log.request_id = response_id
    log.prompt_tokens = len(prompt_ids)
    created = int(time.time())
    base = _base(body, response_id, created, serving.model_name)
    engine_request = EngineRequest(request_id=response_id, prompt_token_ids=prompt_ids, sampling_params=sp,
                                   structured=prepared.structured)
    gen = await serving.start_generation(request, [engine_request], stream=bool(body.stream))
    keep = body.store is not False
    headers = {"X-Request-Id": response_id}
    output = choice_output(plan, prepared)

    def usage(completion_tokens: int, cached: int, reasoning: str) -> dict[str, Any]:
        rtok = len(serving.tokens.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return {"input_tokens": len(prompt_ids), "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": rtok},
                "total_tokens": len(prompt_ids) + completion_tokens}

    def finish(status: str, out_items: list[dict[str, Any]], acc_metrics: Any, completion_tokens: int) -> dict[str, Any]:
        cached = getattr(acc_metrics, "num_cached_prompt_tokens", 0) or 0
        obj = response_object(base, status, out_items, usage(completion_tokens, cached, reasoning_text(out_items)),
                              completed_at=int(time.time()))
        log.completion_tokens = completion_tokens
        if keep:
            store.put(obj, items + [_as_input(it) for it in out_items])
        return obj

    if body.stream:
        return StreamingResponse(_stream(gen, output, namespaced, base, finish, log),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    acc: RequestOutput | None = None
    async for _, out in gen:
        if acc is None:
            acc = RequestOutput(out.request_id, [])
        acc.add(out)
    assert acc is not None
    c = acc.outputs[0]
    msg, _ = output.message(c.text)
    status = "incomplete" if c.finish_reason == "length" else "completed"
    obj = finish(status, items_from_message(msg, status, namespaced), acc.metrics, len(c.token_ids))
    return Response(json.dumps(obj, ensure_ascii=False).encode("utf-8"), media_type="application/json",
                    headers=headers)


def _base(body: ResponsesRequest, response_id: str, created: int, model: str) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None else None
    text: dict[str, Any] = {"format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True)
                            if fmt is not None else {"type": "text"}}
    if body.text is not None and body.text.verbosity is not None:
        text["verbosity"] = body.text.verbosity
    return {"id": response_id, "object": "response", "created_at": created, "model": model,
            "instructions": body.instructions, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto", "tools": body.tools or [],
            "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id,
            "reasoning": body.reasoning.model_dump(mode="json", exclude_none=True) if body.reasoning else None,
            "text": text, "truncation": "disabled", "metadata": body.metadata or {}, "store": body.store is not False,
            "background": False, "user": body.user}


def _summary(body: ResponsesRequest) -> dict[str, Any]:
    """What a client sent, in short (the debug log: which fields, items and tools agents use)."""
    items = [body.input[:40]] if isinstance(body.input, str) else [
        f"{i.type or 'message'}:{getattr(i, 'role', None) or getattr(i, 'name', '')}" for i in body.input]
    tools = [f"{t.get('type')}:{t.get('name')}" for t in body.tools or []]
    fields = sorted(body.model_fields_set)
    return {"fields": fields, "input": items, "tools": tools, "tool_choice": body.tool_choice,
            "stream": body.stream, "store": body.store, "include": body.include,
            "reasoning": body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
            "max_output_tokens": body.max_output_tokens}


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item a later turn sends back."""
    return {k: v for k, v in item.items() if v is not None}


_FAILED_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}  # OpenAI's response.error codes


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def _stream(gen: GenerationStream, output: Any, namespaced: dict[str, tuple[str, str]], base: dict[str, Any],
                  finish: Any, log: Any) -> AsyncIterator[bytes]:
    events = EventBuilder(namespaced)
    started = response_object(base, "in_progress", [], None)
    yield _sse(events.event("response.created", response=started))
    yield _sse(events.event("response.in_progress", response=started))
    completion_tokens, metrics = 0, None
    try:
        async for _, out in gen:
            if out.metrics is not None:
                metrics = out.metrics
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                final = o.finish_reason is not None
                for ev in events.feed(output.feed(o.text, final=final)):
                    yield _sse(ev)
                if final:
                    status = "incomplete" if o.finish_reason == "length" else "completed"
                    for ev in events.ensure_item():  # nothing generated: an empty message, as non-streamed
                        yield _sse(ev)
                    for ev in events.close(status):
                        yield _sse(ev)
                    obj = finish(status, events.items, metrics, completion_tokens)
                    yield _sse(events.event(f"response.{status}", response=obj))
    except ClientDisconnected:
        log.stream_error = 499
        return
    except Exception as e:
        err = e if isinstance(e, APIError) else internal_error()
        if not isinstance(e, APIError):
            logger.exception("error while streaming a response")
        log.stream_error = err.status
        yield _sse(events.event("error", code=str(err.code) if err.code is not None else err.type,
                                message=err.message, param=err.param))
        failed = response_object(base, "failed", events.items, None,
                                 error={"code": _FAILED_CODES.get(err.status, "server_error"), "message": err.message})
        yield _sse(events.event("response.failed", response=failed))
    finally:
        await gen.close()


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def get_response(response_id: str, request: Request) -> Response:
    entry = get_store(request).get(response_id)
    if entry is None:
        raise not_found(response_id)
    return Response(json.dumps(entry.response, ensure_ascii=False).encode("utf-8"), media_type="application/json")


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=ERROR_RESPONSES)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if not get_store(request).delete(response_id):
        raise not_found(response_id)
    return DeletedResponse(id=response_id, object="response.deleted", deleted=True)

