"""OpenAI request fields that clients send by default and that do not change what is generated:
accepted, ignored, and each logged once per process (a warning naming the field), as vLLM
accepts and ignores them. Fields that would change the output and are not supported are not
in the request models, so they get the 400 naming them (server/api/errors.py).

`reasoning_effort` reaches the chat template as a variable, with `enable_thinking` = effort !=
"none" unless the request sets that (vLLM's behaviour: gpt-oss's template reads the first,
Qwen3's the second); it is logged as ignored only when the template uses neither.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

# field -> why it can be ignored (the log line and the README say it)
IGNORED_CHAT_FIELDS: dict[str, str] = {
    "metadata": "stored-completion tags; nothing is stored",
    "store": "nothing is stored",
    "service_tier": "one tier here",
    "user": "an end-user id for abuse monitoring",
    "prompt_cache_key": "prefix caching needs no key here",
    "safety_identifier": "an end-user id for abuse monitoring",
    "verbosity": "a length hint no served model's template takes",
    "modalities": "text is the only output modality (['text'] only)",
    "stream_options.include_obfuscation": "no obfuscation padding is added to stream chunks",
    "reasoning_effort": "the chat template uses neither reasoning_effort nor enable_thinking",
}
_logged: set[str] = set()
_lock = threading.Lock()


def _log_once(field: str) -> None:
    with _lock:
        if field in _logged:
            return
        _logged.add(field)
    logger.warning("request field %r is accepted and ignored (%s); logged once", field, IGNORED_CHAT_FIELDS[field])


def template_uses(template: Any, variable: str) -> bool:
    """Whether a chat template (text, or a dict of named templates) mentions `variable`."""
    if isinstance(template, dict):
        return any(template_uses(t, variable) for t in template.values())
    return isinstance(template, str) and variable in template


def note_ignored_chat_fields(body: Any, template: Any) -> list[str]:
    """Log (once each) the accepted-and-ignored fields this chat request set; returns them."""
    found = [name for name in IGNORED_CHAT_FIELDS if "." not in name and name != "reasoning_effort"
             and getattr(body, name, None) is not None]
    if body.stream_options is not None and body.stream_options.include_obfuscation is not None:
        found.append("stream_options.include_obfuscation")
    if body.reasoning_effort is not None and not template_uses(template, "reasoning_effort") and not (
            template_uses(template, "enable_thinking") and "enable_thinking" not in (body.chat_template_kwargs or {})):
        found.append("reasoning_effort")
    for name in found:
        _log_once(name)
    return found
