"""POST /v1/completions: OpenAI's legacy completions (prompt shapes, echo, logprobs, n, stream)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api.body import openapi_body, read_json
from server.api.context import request_log
from server.api.encoder import encode_json
from server.api.errors import bad_request
from server.api.generation import GenerationStream
from server.api.prompt_logprobs import check_prompt_logprob_entries
from server.api.protocol import CompletionRequest
from server.api.routing_json import routing_fields
from server.api.responses import Completion, CompletionChoice, dump, generation_responses
from server.api.responses import LegacyLogprobs as LegacyLogprobsJSON
from server.api.sampling import common_sampling_kwargs
from server.api.serving import Serving, new_id
from server.api.streaming import StreamUsage, respond, usage
from server.api.structured import request_spec
from server.api.tokens import LegacyLogprobs, prompt_logprobs_json
from server.engine.request import EngineRequest, Logprob, RequestOutput

router = APIRouter()


@dataclass
class _Plan:
    """What the response needs to know about the request, per engine request `i`."""

    request_id: str
    created: int
    model: str
    n: int
    echo: bool
    logprobs: int | None
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    prompt_logprobs: int | None
    return_routing: bool

    def index(self, i: int, output_index: int) -> int:
        return i * self.n + output_index

    def base(self) -> dict[str, Any]:
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model}

    def logprobs_json(self, builder: LegacyLogprobs, i: int, first: bool, prompt_entries: list[Logprob | None] | None,
                      entries: list[Logprob] | None, token_ids: list[int]) -> LegacyLogprobsJSON | None:
        """The legacy logprobs of these tokens (after the echoed prompt's, on the first part)."""
        if self.logprobs is None:
            return None
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first and self.echo:
            _extend(out, _prompt_entries(builder, self.prompt_ids[i], prompt_entries))
        _extend(out, builder.build(list(entries or []), token_ids))
        return LegacyLogprobsJSON(**out)


@router.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest), response_model=None,
             responses=generation_responses(Completion, Completion))
async def create_completion(request: Request) -> Response:
    body = await read_json(request, CompletionRequest)
    serving: Serving = request.app.state.serving
    # cheap checks first, on the event loop; tokenization runs on the tokenizer thread
    serving.check_model(body.model)
    if body.suffix is not None:
        raise bad_request("suffix: is not supported by this server", param="suffix")
    n = body.n if body.n is not None else 1
    if body.best_of is not None and body.best_of != n:
        raise bad_request("best_of: only best_of equal to n is supported", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options: only allowed when stream is true", param="stream_options")
    serving.limits.check_prompt_count(body.prompt)
    spec = request_spec(body)  # structured output: checked here, compiled in the compile pool
    request_id = new_id("cmpl")
    log = request_log(request)
    log.request_id = request_id
    structured = await serving.compile_structured(spec, request) if spec is not None else None
    engine_requests, plan = await serving.tokens.run_blocking(_prepare, serving, body, request_id, structured)
    log.prompt_tokens = sum(len(ids) for ids in plan.prompt_ids)
    gen = await serving.start_generation(request, engine_requests, stream=bool(body.stream))

    def chunks() -> tuple[AsyncIterator[dict[str, Any] | bytes], StreamUsage]:
        state = StreamUsage(Completion, plan.base(), log.prompt_tokens, body.stream_options)
        return _stream(serving, plan, gen, state), state

    return await respond(bool(body.stream), log, {"X-Request-Id": request_id}, chunks,
                         lambda: _collect(serving, plan, gen, log))


def _prepare(serving: Serving, body: CompletionRequest, request_id: str,
             structured: Any | None) -> tuple[list[EngineRequest], _Plan]:
    """Tokenize and validate (on the tokenizer thread): the engine requests (with the compiled
    grammar, if any) and the response plan."""
    prompts = serving.tokens.completion_prompts(body.prompt)
    check_prompt_logprob_entries([len(ids) for ids, _ in prompts], body.n if body.n is not None else 1,
                                 body.prompt_logprobs, body.logprobs if body.echo else None)
    explicit_max = "max_tokens" in body.model_fields_set
    prompt_lp = body.prompt_logprobs
    if body.echo and body.logprobs is not None:  # echoed prompt tokens carry logprobs too
        prompt_lp = max(prompt_lp or 0, body.logprobs)
    common = common_sampling_kwargs(body)
    common["prompt_logprobs"] = prompt_lp
    engine_requests = []
    for i, (ids, text) in enumerate(prompts):
        max_tokens = serving.limits.resolve_max_tokens(len(ids), body.max_tokens, explicit_max,
                                                prompt_param="prompt" if len(prompts) == 1 else f"prompt[{i}]")
        sp = serving.sampling_params(max_tokens=max_tokens, logprobs=body.logprobs, **common)
        engine_requests.append(EngineRequest(
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
            prompt_token_ids=ids, sampling_params=sp, prompt=text,
            priority=body.priority or 0, return_routing=bool(body.return_routing), structured=structured))
    plan = _Plan(request_id=request_id, created=int(time.time()), model=serving.model_name,
                 n=body.n if body.n is not None else 1, echo=bool(body.echo), logprobs=body.logprobs,
                 prompt_ids=[ids for ids, _ in prompts],
                 prompt_texts=[t if t is not None else serving.tokens.decode(ids) for ids, t in prompts],
                 prompt_logprobs=body.prompt_logprobs, return_routing=bool(body.return_routing))
    return engine_requests, plan


async def _collect(serving: Serving, plan: _Plan, gen: GenerationStream, log: Any) -> bytes:
    merged: dict[int, RequestOutput] = {}  # per engine request (prompt)
    async for i, out in gen:
        merged.setdefault(i, RequestOutput(out.request_id, [])).add(out)
    return await serving.encoder.run(_completion_json, serving, plan, merged, log)


def _completion_json(serving: Serving, plan: _Plan, merged: dict[int, RequestOutput], log: Any) -> bytes:
    """The whole answer as JSON (on the encoder thread: it may be big). A prompt's
    prompt_logprobs are built once and go into each of its choices, past pydantic (plain JSON)."""
    choices: list[tuple[int, dict[str, Any]]] = []
    for i in sorted(merged):
        acc = merged[i]
        prompt_lps = (prompt_logprobs_json(serving.token_text, acc.prompt_logprobs, plan.prompt_logprobs)
                      if plan.prompt_logprobs is not None else None)
        for c in acc.outputs:
            builder = LegacyLogprobs(serving.token_text, plan.logprobs or 0)
            choice = CompletionChoice(
                index=plan.index(i, c.index), text=plan.prompt_texts[i] + c.text if plan.echo else c.text,
                logprobs=plan.logprobs_json(builder, i, True, acc.prompt_logprobs, c.logprobs, c.token_ids),
                finish_reason=c.finish_reason)
            if plan.return_routing:
                _set_routing(choice, routing_fields(c.routing, c.routing_weights))
                _set_routing(choice, routing_fields(acc.prompt_routing, acc.prompt_routing_weights, "prompt_")
                             if acc.prompt_routing is not None
                             else {"prompt_routing": None, "prompt_routing_weights": None})
            fields = dump(choice)
            if plan.prompt_logprobs is not None:
                fields["prompt_logprobs"] = prompt_lps
            choices.append((choice.index, fields))
    completion_tokens = sum(len(c.token_ids) for acc in merged.values() for c in acc.outputs)
    log.completion_tokens = completion_tokens
    finished = [acc.metrics for acc in merged.values() if acc.finished]
    body = dump(Completion(**plan.base(), choices=[], usage=usage(log.prompt_tokens, completion_tokens, finished)))
    body["choices"] = [fields for _, fields in sorted(choices, key=lambda c: c[0])]
    return encode_json(body)


async def _stream(serving: Serving, plan: _Plan, gen: GenerationStream,
                  state: StreamUsage) -> AsyncIterator[dict[str, Any] | bytes]:
    """Chunks; a prompt's data (its prompt_logprobs, once per prompt; its echoed tokens' logprobs;
    its routing) can be big: the chunks that carry it are built on the encoder thread."""
    builders: dict[int, LegacyLogprobs] = {}
    prompts_sent: set[int] = set()  # engine requests whose prompt_logprobs went out
    for_prompt = plan.prompt_logprobs is not None or (plan.echo and plan.logprobs is not None) or plan.return_routing
    async for i, out in gen:
        state.observe(out)
        for o in out.outputs:
            idx = plan.index(i, o.index)
            state.completion_tokens += len(o.token_ids)
            first = idx not in builders
            if first:
                builders[idx] = LegacyLogprobs(serving.token_text, plan.logprobs or 0)
            with_prompt = plan.prompt_logprobs is not None and i not in prompts_sent
            prompts_sent.add(i)
            args = (serving, plan, state, builders[idx], i, idx, out, o, first, with_prompt)
            if first and for_prompt:
                yield await serving.encoder.run(_chunk_json, *args)
            else:
                chunk = _chunk(*args)
                if chunk is not None:
                    yield chunk


def _chunk(serving: Serving, plan: _Plan, state: StreamUsage, builder: LegacyLogprobs, i: int, idx: int,
           out: RequestOutput, o: Any, first: bool, with_prompt: bool) -> dict[str, Any] | None:
    """The chunk of choice `idx` for this delta (None: nothing to send)."""
    logprobs = plan.logprobs_json(builder, i, first, out.prompt_logprobs, o.logprobs, o.token_ids)
    text = plan.prompt_texts[i] + o.text if first and plan.echo else o.text
    if not text and not o.token_ids and o.finish_reason is None and not first:
        return None
    choice = CompletionChoice(index=idx, text=text, logprobs=logprobs, finish_reason=o.finish_reason)
    if plan.return_routing:
        _set_routing(choice, routing_fields(o.routing, o.routing_weights))
        if first and out.prompt_routing is not None:
            _set_routing(choice, routing_fields(out.prompt_routing, out.prompt_routing_weights, "prompt_"))
    chunk = state.chunk([choice])
    if with_prompt:
        chunk["choices"][0]["prompt_logprobs"] = prompt_logprobs_json(serving.token_text, out.prompt_logprobs,
                                                                      plan.prompt_logprobs)
    return chunk


def _chunk_json(*args: Any) -> bytes:
    chunk = _chunk(*args)
    assert chunk is not None  # a choice's first chunk always goes out
    return encode_json(chunk)


def _set_routing(choice: CompletionChoice, fields: dict[str, list | None]) -> None:
    for name, value in fields.items():
        setattr(choice, name, value)


def _prompt_entries(builder: LegacyLogprobs, ids: list[int],
                    entries: list[Logprob | None] | None) -> dict[str, Any]:
    if entries is None or len(entries) != len(ids):
        entries = [None] * len(ids)
    return builder.build(list(entries), ids)


def _extend(into: dict[str, list[Any]], more: dict[str, list[Any]]) -> None:
    for key, values in more.items():
        into[key].extend(values)
