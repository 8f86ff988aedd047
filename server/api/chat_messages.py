"""Chat messages -> the dicts a chat template renders, and the rendering itself.

Roles: system, developer (rendered as system), user, assistant (with `tool_calls`, whose
`arguments` reach the template as objects), tool (with `tool_call_id`). Content is a string or
a list of text parts (joined with newlines). Tools reach the template as `tools=[...]` (OpenAI's
function definitions), extra variables as `chat_template_kwargs`; `--chat-template` replaces the
tokenizer's template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.api.errors import bad_request, truncate
from server.api.protocol import ChatMessage
from server.api.tools import history_tool_calls

ROLES = ("system", "developer", "user", "assistant", "tool")
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
    p = f"messages[{k}]"
    if m.role not in ROLES:
        raise bad_request(f"{p}.role: unknown role '{truncate(m.role, 40)}'; expected one of "
                          f"{', '.join(ROLES)}", param=f"{p}.role")
    if m.tool_calls is not None and m.role != "assistant":
        raise bad_request(f"{p}.tool_calls: only assistant messages have tool calls", param=f"{p}.tool_calls")
    if m.role == "tool" and m.tool_call_id is None:
        raise bad_request(f"{p}.tool_call_id: is required for tool messages", param=f"{p}.tool_call_id")
    content = m.content
    if content is None and not m.tool_calls:
        raise bad_request(f"{p}.content: is required", param=f"{p}.content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            ptype = part.get("type")
            if ptype != "text":
                raise bad_request(
                    f"{p}.content[{j}]: content part type '{truncate(str(ptype), 30)}' is not "
                    f"supported; this model accepts text only", param=f"{p}.content[{j}].type")
            text = part.get("text")
            if not isinstance(text, str) or set(part) - {"type", "text"}:
                raise bad_request(f"{p}.content[{j}]: a text part is {{'type': 'text', 'text': str}}",
                                  param=f"{p}.content[{j}]")
            texts.append(text)
        content = TEXT_JOINER.join(texts)
    role = "system" if m.role == "developer" else m.role
    d: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        d["tool_calls"] = history_tool_calls(m.tool_calls, p)
    if m.reasoning is not None and m.role == "assistant":
        d["reasoning_content"] = m.reasoning  # the name chat templates read (Qwen3, DeepSeek, GLM)
    return d
