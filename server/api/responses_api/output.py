"""The chat layer's output -> Responses output items, whole (`items_from_message`) or as the
streamed semantic events (`EventBuilder`), and the response object around them.

Items come in the order the model wrote them: `reasoning` (with `--reasoning-parser`), then the
assistant `message`, then one `function_call` per tool call. Streaming sends for each item
`response.output_item.added`, its content (`response.content_part.added`, the text deltas,
`*.done`), then `response.output_item.done`; the items the events add up to are the items of
the final `response.completed` / `response.incomplete` object, so a streamed response equals
the non-streamed one (call ids aside).
"""

from __future__ import annotations

import secrets
from typing import Any

from server.api.responses_api.protocol import ResponseObject


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _reasoning_item(iid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": iid, "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(iid: str, text: str | None, status: str) -> dict[str, Any]:
    return {"type": "message", "id": iid, "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text)]}


def _call_item(iid: str, call_id: str, name: str, arguments: str, status: str,
               namespaced: dict[str, tuple[str, str]]) -> dict[str, Any]:
    item = {"type": "function_call", "id": iid, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
    if name in namespaced:
        item["namespace"], item["name"] = namespaced[name]
    return item


def items_from_message(msg: dict[str, Any], status: str, namespaced: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """The chat layer's assistant message (server/api/chat_output.py) -> output items."""
    items = []
    if msg.get("reasoning_content"):
        items.append(_reasoning_item(item_id("rs"), msg["reasoning_content"], status))
    calls = msg.get("tool_calls") or []
    if msg.get("content") or not (calls or items):  # nothing at all: an empty message
        items.append(_message_item(item_id("msg"), msg.get("content") or "", status))
    for call in calls:
        fn = call["function"]
        items.append(_call_item(item_id("fc"), call["id"], fn["name"], fn["arguments"], status, namespaced))
    return items


def reasoning_text(items: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for it in items if it["type"] == "reasoning" for p in it["content"])


def response_object(base: dict[str, Any], status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, error: dict[str, Any] | None = None,
                    completed_at: int | None = None) -> dict[str, Any]:
    fields = {**base, "status": status, "output": output, "usage": usage, "error": error,
              "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}
    if completed_at is not None:
        fields["completed_at"] = completed_at
    return ResponseObject.model_validate(fields).model_dump(mode="json", exclude_unset=True)


class EventBuilder:
    """Streamed events, numbered (`sequence_number`), from the chat layer's stream deltas
    (`reasoning_content`, `content`, `tool_calls` pieces)."""

    def __init__(self, namespaced: dict[str, tuple[str, str]]) -> None:
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # every item so far (the open one last)
        self._open: str | None = None  # "reasoning" | "message" | "call"
        self._text = ""  # the open item's text or arguments
        self._calls: dict[int, int] = {}  # tool-call delta index -> position in items
        self._namespaced = namespaced

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _add(self, kind: str, item: dict[str, Any], part: dict[str, Any] | None) -> list[dict[str, Any]]:
        self.items.append(item)
        self._open, self._text = kind, ""
        out = [self.event("response.output_item.added", output_index=len(self.items) - 1,
                          item={**item, "content": []} if "content" in item else dict(item))]
        if part is not None:
            out.append(self.event("response.content_part.added", **self._where(), content_index=0, part=part))
        return out

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if delta.get("reasoning_content"):
            if self._open != "reasoning":
                out += self.close()
                out += self._add("reasoning", _reasoning_item(item_id("rs"), "", "in_progress"),
                                 {"type": "reasoning_text", "text": ""})
            self._text += delta["reasoning_content"]
            out.append(self.event("response.reasoning_text.delta", **self._where(), content_index=0,
                                  delta=delta["reasoning_content"]))
        if delta.get("content"):
            if self._open != "message":
                out += self.close()
                out += self._add("message", _message_item(item_id("msg"), "", "in_progress"), _text_part(""))
            self._text += delta["content"]
            out.append(self.event("response.output_text.delta", **self._where(), content_index=0,
                                  delta=delta["content"], logprobs=[]))
        for piece in delta.get("tool_calls") or []:
            fn = piece.get("function") or {}
            if piece["index"] not in self._calls:
                out += self.close()
                out += self._add("call", _call_item(item_id("fc"), piece.get("id") or item_id("call"),
                                                    fn.get("name", ""), "", "in_progress", self._namespaced), None)
                self._calls[piece["index"]] = len(self.items) - 1
            if fn.get("arguments"):
                self._text += fn["arguments"]
                out.append(self.event("response.function_call_arguments.delta", **self._where(),
                                      delta=fn["arguments"]))
        return out

    def ensure_item(self) -> list[dict[str, Any]]:
        """An empty message when the output produced no item."""
        if self.items:
            return []
        return self._add("message", _message_item(item_id("msg"), "", "in_progress"), _text_part(""))

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """The `*.done` events of the open item (it becomes final with `status`)."""
        if self._open is None:
            return []
        item, text, where = self.items[-1], self._text, self._where()
        out = []
        if self._open == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out.append(self.event("response.reasoning_text.done", **where, content_index=0, text=text))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        elif self._open == "message":
            out.append(self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=_text_part(text)))
            item["content"] = [_text_part(text)]
        else:
            item["arguments"] = text
            out.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=text))
        item["status"] = status
        out.append(self.event("response.output_item.done", output_index=where["output_index"], item=item))
        self._open, self._text = None, ""
        return out
