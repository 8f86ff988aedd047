"""What a chat request needs beyond sampling: its tool plan, its structured-output constraint and
its reasoning mode, checked cheaply on the event loop (`plan_chat`), then (the grammar compiled in
the compile pool) the prompt rendered on the tokenizer thread (`prepare_chat`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from server.api.chat_output import ChoiceOutput
from server.api.errors import bad_request
from server.api.protocol import ChatCompletionRequest
from server.api.structured import request_spec
from server.api.tools import ToolPlan, plan_tools
from server.engine.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatPlan:
    tools: ToolPlan
    spec: StructuredSpec | None  # the request's constraint, or the one of required / named tool choices
    reasoning: Any | None  # the reasoning parser class (--reasoning-parser)
    tool_parser: Any | None  # the --tool-call-parser instance, used when tools.mode == "auto"

    def sampling_overrides(self, body: ChatCompletionRequest) -> dict[str, Any]:
        """Special tokens stay in the text when the tool parser or the reasoning parser needs them
        (unless the request says)."""
        if body.skip_special_tokens is not None:
            return {}
        if self.tools.mode == "auto" and self.tool_parser is not None and self.tool_parser.needs_special_tokens:
            return {"skip_special_tokens": False}
        if getattr(self.reasoning, "needs_special_tokens", False):
            return {"skip_special_tokens": False}
        return {}


@dataclass(frozen=True)
class PreparedChat:
    prompt_ids: list[int]
    structured: Any | None  # CompiledStructure
    in_reasoning: bool  # the output starts inside the reasoning part


def plan_chat(serving: Any, body: ChatCompletionRequest) -> ChatPlan:
    tools = plan_tools(body, serving.tool_parser is not None)
    if tools.mode == "auto" and serving.tool_parser is None and not serving.warned_auto_without_parser:
        serving.warned_auto_without_parser = True  # once per server (and once at startup: Serving)
        logger.warning("a request asked for tool_choice 'auto' but the server runs without --tool-call-parser: "
                       "such requests get the model's text as content, no tool calls (logged once)")
    spec = request_spec(body)
    if tools.spec is not None:
        if spec is not None:
            raise bad_request(f"tool_choice: a required or named tool choice is enforced by its own grammar and "
                              f"cannot be combined with {spec.param}", param="tool_choice")
        if body.min_tokens:
            raise bad_request("min_tokens: not supported together with a required or named tool choice",
                              param="min_tokens")
        spec = tools.spec
    if tools.tools:
        _check_history_names(body, {t["function"]["name"] for t in tools.tools})
    _check_tool_messages(body)
    if body.chat_template_kwargs is not None and len(body.chat_template_kwargs) > 64:
        raise bad_request("chat_template_kwargs: at most 64 entries", param="chat_template_kwargs")
    return ChatPlan(tools, spec, serving.reasoning_parser, serving.tool_parser)


def _check_history_names(body: ChatCompletionRequest, names: set[str]) -> None:
    """Tool calls in the history must name one of the request's tools."""
    for k, m in enumerate(body.messages):
        for j, call in enumerate(getattr(m, "tool_calls", None) or []):
            name = call.function.name
            if name not in names:
                p = f"messages[{k}].tool_calls[{j}].function.name"
                raise bad_request(f"{p}: unknown tool '{name[:64]}' (not in tools)", param=p)


def _check_tool_messages(body: ChatCompletionRequest) -> None:
    """As OpenAI: a `tool` message answers a call of the assistant message it follows (directly or
    after other tool messages), naming that call's id."""
    open_ids: set[str] | None = None  # the call ids of the assistant message the tool messages follow
    for k, m in enumerate(body.messages):
        if m.role == "tool":
            p = f"messages[{k}]"
            if open_ids is None:
                raise bad_request(f"{p}: a 'tool' message must answer a preceding assistant message with "
                                  f"'tool_calls'", param=f"{p}.role")
            if m.tool_call_id not in open_ids:
                raise bad_request(f"{p}.tool_call_id: '{m.tool_call_id[:64]}' is not the id of a tool call of the "
                                  f"preceding assistant message", param=f"{p}.tool_call_id")
        elif m.role == "assistant" and m.tool_calls:
            open_ids = {c.id for c in m.tool_calls if c.id is not None}
        else:
            open_ids = None


def prepare_chat(serving: Any, body: ChatCompletionRequest, plan: ChatPlan, compiled: Any | None) -> PreparedChat:
    """On the tokenizer thread: render and tokenize the prompt; the compiled grammar (if any)
    starts after the reasoning part when the output starts inside one."""
    kwargs = template_kwargs(body)
    text = serving.tokens.render_chat(body.messages, True, tools=plan.tools.tools, template_kwargs=kwargs)
    ids = serving.tokens.encode(text, add_special_tokens=False, limit=serving.limits.max_model_len - 1, param="messages")
    in_reasoning = bool(plan.reasoning and plan.reasoning.starts_in_reasoning(text, kwargs))
    if compiled is not None and in_reasoning:
        compiled = compiled.with_gate(tuple(serving.tokens.tokenizer.encode(plan.reasoning.end_tag, add_special_tokens=False)))
    return PreparedChat(ids, compiled, in_reasoning)


def template_kwargs(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The chat template's extra variables: `chat_template_kwargs`, plus, as vLLM passes them,
    `reasoning_effort` and (unless the request sets it) `enable_thinking` = effort != "none"."""
    kwargs = body.chat_template_kwargs
    effort = getattr(body, "reasoning_effort", None)
    if effort is not None:
        extra = {"reasoning_effort": effort}
        if "enable_thinking" not in (kwargs or {}):
            extra["enable_thinking"] = effort != "none"
        kwargs = {**extra, **(kwargs or {})}
    return kwargs


def choice_output(plan: ChatPlan, prepared: PreparedChat) -> ChoiceOutput:
    reasoning = plan.reasoning(prepared.in_reasoning) if plan.reasoning is not None else None
    return ChoiceOutput(plan.tools, plan.tool_parser, reasoning)
