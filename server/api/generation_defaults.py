"""Default sampling parameters from a model's `generation_config.json`, as vLLM applies them
(`--generation-config auto|vllm|<dir>`).

- `auto` (the default, as in vLLM): the model directory's generation_config.json;
  `vllm`: none (the server's own defaults); a directory: the generation_config.json in it.
- Read: `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` and `max_new_tokens`,
  each where the file sets it to something other than transformers' GenerationConfig default
  (vLLM reads the file's `to_diff_dict()`: a file's `temperature: 1.0` or `top_k: 50` is no
  default). `do_sample` is ignored, as vLLM ignores it.
- Applied: each is the default of the request field of the same name; a request that sets the
  field overrides it. `max_new_tokens` caps every request's `max_tokens` /
  `max_completion_tokens`, explicit ones too (vLLM takes the smallest of it, the request's value
  and the room left in the context).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
# transformers' GenerationConfig defaults: values equal to them are not in to_diff_dict()
_HF_DEFAULTS = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
                "max_new_tokens": None}
FILE = "generation_config.json"


class GenerationConfigError(ValueError):
    pass


def generation_config_file(value: str, model_dir: str) -> Path | None:
    """The file `--generation-config` names (None: none)."""
    if value == "vllm":
        return None
    if value == "auto":
        path = Path(model_dir) / FILE
        return path if path.is_file() else None
    path = Path(value)
    if not path.is_dir() or not (path / FILE).is_file():
        raise GenerationConfigError(f"--generation-config {value!r}: expected auto, vllm or a directory holding "
                                    f"{FILE}")
    return path / FILE


def load_defaults(value: str, model_dir: str) -> tuple[dict[str, Any], Path | None]:
    """({request field: default}, the file read): max_new_tokens becomes max_tokens."""
    path = generation_config_file(value, model_dir)
    if path is None:
        return {}, None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerationConfigError(f"{path}: not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise GenerationConfigError(f"{path}: not a JSON object")
    out: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        v = raw.get(key)
        if v is None or v == _HF_DEFAULTS[key] or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out["max_tokens" if key == "max_new_tokens" else key] = v
    return out, path


def describe(defaults: dict[str, Any], path: Path | None, value: str) -> str:
    """The startup log line."""
    if path is None:
        why = "--generation-config vllm" if value == "vllm" else f"no {FILE} in the model directory"
        return f"default sampling parameters: the server's own ({why})"
    if not defaults:
        return f"default sampling parameters: the server's own ({path} sets none of {', '.join(SAMPLING_KEYS)})"
    shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return f"default sampling parameters from {path}: {shown} (a request's own values override them)"


def apply_defaults(kwargs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The sampling kwargs with the defaults filled in where the request left a field unset,
    and max_tokens capped by the file's max_new_tokens."""
    if not defaults:
        return kwargs
    out = dict(kwargs)
    for key, value in defaults.items():
        if key == "max_tokens":
            if out.get("max_tokens") is not None:
                out["max_tokens"] = min(out["max_tokens"], value)
        elif out.get(key) is None:
            out[key] = value
    return out
