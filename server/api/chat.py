"""POST /v1/chat/completions: chat template -> one engine request with n samples."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api.body import openapi_body, read_json
from server.api.chat_output import ChoiceOutput
from server.api.chat_setup import choice_output, plan_chat, prepare_chat
from server.api.context import request_log
from server.api.encoder import encode_json
from server.api.errors import bad_request
from server.api.generation import GenerationStream
from server.api.ignored import note_ignored_chat_fields
from server.api.prompt_logprobs import check_prompt_logprob_entries
from server.api.protocol import ChatCompletionRequest
from server.api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    dump,
    generation_responses,
)
from server.api.routing_json import ids_json, routing_fields, weights_json
from server.api.sampling import common_sampling_kwargs
from server.api.serving import Serving, new_id
from server.api.streaming import StreamUsage, respond, usage
from server.api.tokens import prompt_logprobs_json
from server.engine.request import EngineRequest, Logprob, RequestOutput

router = APIRouter()


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed when stream is true", param="stream_options")
    if body.top_logprobs is not None and not body.logprobs:  # its range: the request model
        raise bad_request("top_logprobs: requires logprobs to be true", param="top_logprobs")


@router.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest),
             response_model=None, responses=generation_responses(ChatCompletion, ChatCompletionChunk))
async def create_chat_completion(request: Request) -> Response:
    body = await read_json(request, ChatCompletionRequest)
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    _check_unsupported(body)
    note_ignored_chat_fields(body, serving.tokens.chat_template or getattr(serving.tokens.tokenizer, "chat_template", None))
    plan = plan_chat(serving, body)  # tools, structured output, reasoning: cheap checks first
    serving.limits.check_capacity(1)
    compiled = await serving.compile_structured(plan.spec, request) if plan.spec is not None else None
    prepared = await serving.tokens.run_blocking(prepare_chat, serving, body, plan, compiled)  # template, tokens
    prompt_ids = prepared.prompt_ids
    check_prompt_logprob_entries([len(prompt_ids)], 1, body.prompt_logprobs)  # sent once per response
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = serving.limits.resolve_max_tokens(len(prompt_ids), requested, explicit=True, param=param,
                                            prompt_param="messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    sp = serving.sampling_params(max_tokens=max_tokens, logprobs=top,
                                 **{**common_sampling_kwargs(body), **plan.sampling_overrides(body)})
    request_id = new_id("chatcmpl")
    log = request_log(request)
    log.request_id = request_id
    log.prompt_tokens = len(prompt_ids)
    engine_request = EngineRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling_params=sp,
                                   priority=body.priority or 0, return_routing=bool(body.return_routing),
                                   structured=prepared.structured)
    base = {"id": request_id, "created": int(time.time()), "model": serving.model_name}
    gen = await serving.start_generation(request, [engine_request], stream=bool(body.stream))

    def chunks() -> tuple[AsyncIterator[dict[str, Any] | bytes], StreamUsage]:
        state = StreamUsage(ChatCompletionChunk, {**base, "object": "chat.completion.chunk"}, len(prompt_ids),
                            body.stream_options)
        outputs = [choice_output(plan, prepared) for _ in range(sp.n)]
        return _stream(serving, body, outputs, top, gen, state), state

    return await respond(bool(body.stream), log, {"X-Request-Id": request_id}, chunks, lambda: _collect(
        serving, body, choice_output(plan, prepared), top, {**base, "object": "chat.completion"},
        len(prompt_ids), gen, log))


def _reasoning_names(fields: dict[str, Any], legacy: bool) -> dict[str, Any]:
    """ChoiceOutput's `reasoning_content` goes out as `reasoning` (vLLM's name now), and also
    under the older name with --legacy-reasoning-content."""
    if "reasoning_content" not in fields:
        return fields
    out = dict(fields)
    out["reasoning"] = out["reasoning_content"] if legacy else out.pop("reasoning_content")
    return out


def _logprob_entries(serving: Serving, entries: list[Logprob] | None, top: int) -> list[dict[str, Any]]:
    return [serving.token_text.chat_entry(lp, top) for lp in entries or []]


async def _collect(serving: Serving, body: ChatCompletionRequest, output: ChoiceOutput, top: int | None,
                   base: dict[str, Any], prompt_tokens: int, gen: GenerationStream, log: Any) -> bytes:
    acc: RequestOutput | None = None
    async for _, out in gen:
        if acc is None:
            acc = RequestOutput(out.request_id, [])
        acc.add(out)
    assert acc is not None  # the stream yields at least the first output
    return await serving.encoder.run(_chat_json, serving, body, output, top, base, prompt_tokens, acc, log)


def _chat_json(serving: Serving, body: ChatCompletionRequest, output: ChoiceOutput, top: int | None,
               base: dict[str, Any], prompt_tokens: int, acc: RequestOutput, log: Any) -> bytes:
    """The whole answer as JSON (on the encoder thread: it may be big); prompt_logprobs go in
    past pydantic (plain JSON already)."""
    choices = []
    for c in acc.outputs:
        message, called = output.message(c.text)
        choice = ChatChoice(
            index=c.index, message=_reasoning_names(message, serving.config.legacy_reasoning_content),  # type: ignore[arg-type]
            logprobs=ChatLogprobs(content=_logprob_entries(serving, c.logprobs, top))  # type: ignore[arg-type]
            if top is not None else None,
            finish_reason=output.finish_reason(c.finish_reason, called))
        if body.return_routing:
            choice.routing, choice.routing_weights = ids_json(c.routing), weights_json(c.routing_weights)
        choices.append(choice)
    completion_tokens = sum(len(c.token_ids) for c in acc.outputs)
    log.completion_tokens = completion_tokens
    response = ChatCompletion(**base, choices=choices,
                              usage=usage(prompt_tokens, completion_tokens, [acc.metrics] if acc.finished else []))
    if body.return_routing and acc.prompt_routing is not None:
        response.prompt_routing = ids_json(acc.prompt_routing)
        response.prompt_routing_weights = weights_json(acc.prompt_routing_weights)
    fields = dump(response)
    if body.prompt_logprobs is not None:
        fields["prompt_logprobs"] = prompt_logprobs_json(serving.token_text, acc.prompt_logprobs, body.prompt_logprobs)
    return encode_json(fields)


async def _stream(serving: Serving, body: ChatCompletionRequest, outputs: list[ChoiceOutput], top: int | None,
                  gen: GenerationStream, state: StreamUsage) -> AsyncIterator[dict[str, Any] | bytes]:
    held: dict[int, list[dict[str, Any]]] = {}  # logprob entries of text not sent yet
    for idx in range(len(outputs)):  # OpenAI: the role comes first, with empty content
        yield state.chunk([ChatChunkChoice(index=idx, delta=ChatDelta(role="assistant", content=""),
                                           logprobs=None, finish_reason=None)])
    first = True
    # what the first chunk sent carries (kept until one is sent: a parser may hold the first text back)
    extra: dict[str, Any] = {}
    prompt_lps: list[Any] | None = None  # built on the encoder thread
    async for _, out in gen:
        state.observe(out)
        if first and body.prompt_logprobs is not None:
            prompt_lps = await serving.encoder.run(prompt_logprobs_json, serving.token_text, out.prompt_logprobs,
                                                   body.prompt_logprobs)
        if first and body.return_routing and out.prompt_routing is not None:
            extra.update(routing_fields(out.prompt_routing, out.prompt_routing_weights, "prompt_"))
        first = False
        for o in out.outputs:
            state.completion_tokens += len(o.token_ids)
            parser = outputs[o.index]
            if top is not None:
                held.setdefault(o.index, []).extend(_logprob_entries(serving, o.logprobs, top))
            delta = parser.feed(o.text, final=o.finish_reason is not None)
            if delta or (body.return_routing and o.token_ids):
                choice = ChatChunkChoice(
                    index=o.index, delta=ChatDelta(**_reasoning_names(delta, serving.config.legacy_reasoning_content)),
                    logprobs=ChatLogprobs(content=held.pop(o.index, []))  # type: ignore[arg-type]
                    if top is not None else None,
                    finish_reason=None)
                if body.return_routing:
                    choice.routing, choice.routing_weights = ids_json(o.routing), weights_json(o.routing_weights)
                yield await _chunk(serving, state, choice, extra, prompt_lps)
                extra, prompt_lps = {}, None
            if o.finish_reason is not None:
                rest = held.pop(o.index, None)
                choice = ChatChunkChoice(index=o.index, delta=ChatDelta(),
                                         logprobs=ChatLogprobs(content=rest) if rest else None,  # type: ignore[arg-type]
                                         finish_reason=parser.stream_finish_reason(o.finish_reason))
                yield await _chunk(serving, state, choice, extra, prompt_lps)
                extra, prompt_lps = {}, None


async def _chunk(serving: Serving, state: StreamUsage, choice: ChatChunkChoice, extra: dict[str, Any],
                 prompt_lps: list[Any] | None) -> dict[str, Any] | bytes:
    """A chunk; the one that carries the prompt's data (prompt_routing, prompt_logprobs), which
    can be big, is built and serialized on the encoder thread."""
    if not extra and prompt_lps is None:
        return state.chunk([choice])
    return await serving.encoder.run(_prompt_chunk_json, state, choice, extra, prompt_lps)


def _prompt_chunk_json(state: StreamUsage, choice: ChatChunkChoice, extra: dict[str, Any],
                       prompt_lps: list[Any] | None) -> bytes:
    chunk = state.chunk([choice], **extra)
    if prompt_lps is not None:  # plain JSON already: past pydantic
        chunk["prompt_logprobs"] = prompt_lps
    return encode_json(chunk)
