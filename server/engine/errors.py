"""The errors an engine raises to the API (each maps to one HTTP answer, server/api/errors.py)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine cannot continue; /health fails and the process should exit non-zero."""


class EngineOverloadedError(RuntimeError):
    """Too many requests queued; the API answers 429 with Retry-After."""


class RequestTooLongError(ValueError):
    """Prompt (plus max_tokens) does not fit the context; the API answers 400."""
