"""Chat messages -> the dicts a chat template renders, and the rendering itself.

Roles: system, developer (rendered as system), user, assistant (with `tool_calls`, whose
`arguments` reach the template as objects, and its thinking as `reasoning_content` and
`reasoning`), tool (with `tool_call_id`). Content is a string or a list of text parts (joined
with newlines); the request models (server/api/protocol.py) refuse every other part type. Tools reach the template as `tools=[...]` (OpenAI's
function definitions), extra variables as `chat_template_kwargs`; `--chat-template` replaces the
tokenizer's template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.api.errors import bad_request, truncate
from server.api.protocol import (
    AssistantHistoryMessage,
    ChatMessage,
    TextPart,
    ToolMessage,
)
from server.api.tools import history_tool_calls

TEXT_JOINER = "\n"
# template variables a request may not override (they are the conversation itself)
_RESERVED_KWARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                    "chat_template", "return_dict", "continue_final_message"}


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file's text when the value names an existing file, else the value."""
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and "\n" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def render(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool, *,
           tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
           chat_template: str | None = None) -> str:
    if not messages:
        raise bad_request("messages: must be a non-empty list", param="messages")
    conversation = [message_dict(k, m) for k, m in enumerate(messages)]
    extra = dict(template_kwargs or {})
    bad = sorted(_RESERVED_KWARGS & set(extra))
    if bad:
        raise bad_request(f"chat_template_kwargs: may not set {', '.join(bad)}", param="chat_template_kwargs")
    if tools is not None:
        extra["tools"] = tools
    if chat_template is not None:
        extra["chat_template"] = chat_template
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)
    except Exception as e:  # jinja's TemplateError, raise_exception(), bad content shapes
        raise bad_request(f"messages: the chat template rejected the conversation: "
                          f"{truncate(str(e), 200)}", param="messages") from None
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        text = text[0]
    return text


def message_dict(k: int, m: ChatMessage) -> dict[str, Any]:
    """One validated message (a role model of server/api/protocol.py) -> the template's dict."""
    p = f"messages[{k}]"
    tool_calls = getattr(m, "tool_calls", None)
    content = m.content
    if content is None and not tool_calls:
        raise bad_request(f"{p}.content: is required", param=f"{p}.content")
    if isinstance(content, list):
        texts = []
        for part in content:
            texts.append(part.text if isinstance(part, TextPart) else part.refusal)
        content = TEXT_JOINER.join(texts)
    role = "system" if m.role == "developer" else m.role
    d: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
    if m.name is not None:
        d["name"] = m.name
    if isinstance(m, ToolMessage):
        d["tool_call_id"] = m.tool_call_id
    if isinstance(m, AssistantHistoryMessage):
        reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content  # vLLM's rule: reasoning wins
        if reasoning is not None:  # Qwen3 / GLM / MiniMax / Kimi templates read `reasoning_content`
            d["reasoning_content"] = d["reasoning"] = d["thinking"] = reasoning  # gpt-oss reads `thinking`
        if tool_calls:
            d["tool_calls"] = history_tool_calls([c.model_dump() for c in tool_calls], p)
    return d
