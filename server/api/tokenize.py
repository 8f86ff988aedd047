"""POST /tokenize and POST /detokenize, in vLLM's shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.body import openapi_body, read_json
from server.api.errors import bad_request
from server.api.protocol import DetokenizeRequest, TokenizeRequest
from server.api.responses import ERROR_RESPONSES, DetokenizeResponse, TokenizeResponse
from server.api.serving import Serving

router = APIRouter()


@router.post("/tokenize", openapi_extra=openapi_body(TokenizeRequest), response_model=TokenizeResponse,
             response_model_exclude_unset=True, responses=ERROR_RESPONSES)
async def tokenize(request: Request) -> TokenizeResponse:
    body = await read_json(request, TokenizeRequest)
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Give exactly one of 'prompt' or 'messages'.", param="prompt")
    return await serving.tokens.run_blocking(_tokenize, serving, body)  # off the event loop


def _tokenize(serving: Serving, body: TokenizeRequest) -> TokenizeResponse:
    if body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = serving.tokens.encode(body.prompt, add_special_tokens=add_special)
    else:
        text = serving.tokens.render_chat(body.messages or [], body.add_generation_prompt)
        ids = serving.tokens.encode(text, add_special_tokens=bool(body.add_special_tokens))
    out = TokenizeResponse(count=len(ids), max_model_len=serving.limits.max_model_len, tokens=ids)
    if body.return_token_strs:
        out.token_strs = serving.tokens.tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest), response_model=DetokenizeResponse,
             responses=ERROR_RESPONSES)
async def detokenize(request: Request) -> DetokenizeResponse:
    body = await read_json(request, DetokenizeRequest)
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    serving.limits.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=await serving.tokens.run_blocking(serving.tokens.decode, body.tokens))
