"""API-key authentication: `Authorization: Bearer <key>` (OpenAI) or `x-api-key: <key>` (Anthropic),
compared in constant time."""

from __future__ import annotations

import hmac


def is_exempt(path: str, exempt_paths: tuple[str, ...]) -> bool:
    """Exact paths; an entry ending in '/' or '*' exempts everything under it."""
    for p in exempt_paths:
        if p.endswith("*") or p.endswith("/"):
            if path.startswith(p.rstrip("*")):
                return True
        elif path == p:
            return True
    return False


def bearer_ok(authorization: bytes | None, api_key: str) -> bool:
    if not authorization:
        return False
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), api_key.encode("utf-8"))


def key_ok(authorization: bytes | None, x_api_key: bytes | None, api_key: str) -> bool:
    """Either header carries the key (Anthropic clients send `x-api-key`)."""
    if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), api_key.encode("utf-8")):
        return True
    return bearer_ok(authorization, api_key)
