"""`--speculative-config`: vLLM's JSON spelling, parsed and checked once at startup.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"method": "draft_model", "model": "/path/to/small-model", "num_speculative_tokens": 3}
    {"method": "mtp", "num_speculative_tokens": 2}   (the checkpoint's MTP layers: spec/mtp.py)
    {"method": "eagle3", "model": "/path/to/eagle3-head", "num_speculative_tokens": 3}

Keys: `method` (ngram, draft_model, mtp, eagle3; vLLM's "[ngram]" and "draft" spellings are
not accepted), `num_speculative_tokens` (k, 1..MAX_SPEC_TOKENS), `prompt_lookup_min` /
`prompt_lookup_max` (n-gram sizes, 1 <= min <= max), `model` (the draft model directory,
required by draft_model / eagle3), `disable_by_batch_size` (no drafts while at least this many
sequences run). Unknown keys are an error (a typo must not silently turn speculation off).
Imports nothing from the engine: server/config.py validates the flag with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model", "mtp", "eagle3")
MAX_SPEC_TOKENS = 16
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
         "disable_by_batch_size"}


class SpeculativeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, text: str | dict[str, Any] | None) -> SpeculativeConfig | None:
        """None for no speculation ('' or None); SpeculativeConfigError saying what is wrong."""
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if isinstance(text, str):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise SpeculativeConfigError(f"--speculative-config is not valid JSON ({e.msg} at char {e.pos})") from None
        else:
            raw = text
        if not isinstance(raw, dict):
            raise SpeculativeConfigError("--speculative-config must be a JSON object, e.g. "
                                         '{"method": "ngram", "num_speculative_tokens": 4}')
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise SpeculativeConfigError(f"--speculative-config: unknown key(s) {', '.join(unknown)}; "
                                         f"known: {', '.join(sorted(_KEYS))}")
        method = raw.get("method")
        if method not in METHODS:
            raise SpeculativeConfigError(f"--speculative-config: method must be one of {', '.join(METHODS)}, "
                                         f"not {method!r}")

        def integer(key: str, default: int | None, low: int, high: int | None = None) -> int | None:
            v = raw.get(key, default)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
                bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
                raise SpeculativeConfigError(f"--speculative-config: {key} must be {bound}, not {v!r}")
            return v

        if "num_speculative_tokens" not in raw:
            raise SpeculativeConfigError("--speculative-config: num_speculative_tokens is required (e.g. 4)")
        k = integer("num_speculative_tokens", None, 1, MAX_SPEC_TOKENS)
        lo = integer("prompt_lookup_min", None, 1)
        hi = integer("prompt_lookup_max", None, 1)
        if method != "ngram" and (lo is not None or hi is not None):
            raise SpeculativeConfigError("--speculative-config: prompt_lookup_min/max apply to method ngram only")
        if lo is None and hi is None:
            lo, hi = 1, 4
        elif lo is None:
            lo = min(1, hi)  # type: ignore[type-var]
        elif hi is None:
            hi = max(lo, 4)
        if lo > hi:  # type: ignore[operator]
            raise SpeculativeConfigError(f"--speculative-config: prompt_lookup_min ({lo}) must be <= "
                                         f"prompt_lookup_max ({hi})")
        model = raw.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise SpeculativeConfigError("--speculative-config: model must be a directory path (a string)")
        if method in ("draft_model", "eagle3") and model is None:
            raise SpeculativeConfigError(f"--speculative-config: method {method} needs \"model\": the "
                                         f"{'draft model' if method == 'draft_model' else 'EAGLE-3 head'} directory")
        if method == "ngram" and model is not None:
            raise SpeculativeConfigError("--speculative-config: method ngram takes no model")
        disable = integer("disable_by_batch_size", None, 1)
        return cls(method, k, lo, hi, model, disable)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if v is not None})
