"""A request body's sampling fields -> `SamplingParams`, with OpenAI's and vLLM's names; every
bad value a 400 naming its parameter (all bad `logit_bias` entries named together)."""

from __future__ import annotations

import math
import re
from typing import Any

from server.api.errors import bad_request, truncate
from server.engine.request import MAX_LOGIT_BIAS, SamplingParams, SamplingParamsError

_INT_KEY = re.compile(r" *[+-]?[0-9]{1,20} *")


def build_sampling_params(vocab_size: int, **kwargs: Any) -> SamplingParams:
    """SamplingParams from the given fields (None: the default), checked against the vocabulary."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = parse_logit_bias(kwargs["logit_bias"], vocab_size)
    try:
        sp = SamplingParams(**kwargs)
        sp.verify_vocab(vocab_size)
    except SamplingParamsError as e:
        raise bad_request(truncate(e.message, 300), param=e.param) from None
    return sp


def parse_logit_bias(raw: dict[str, Any], vocab_size: int) -> dict[int, float]:
    """All bad entries named together: non-integer keys, ids outside the vocabulary, values
    that are not numbers in [-100, 100]."""
    if len(raw) > MAX_LOGIT_BIAS:  # before looking at any entry
        raise bad_request(f"logit_bias: at most {MAX_LOGIT_BIAS} entries; this one has {len(raw)}",
                          param="logit_bias")
    bias: dict[int, float] = {}
    bad: list[str] = []
    for key, value in raw.items():
        if not _INT_KEY.fullmatch(key):
            bad.append(f"{truncate(repr(key), 24)} (not an integer token id)")
            continue
        tid = int(key)
        if not 0 <= tid < vocab_size:
            bad.append(f"{truncate(key, 24)} (outside the vocabulary of {vocab_size})")
        elif (isinstance(value, bool) or not isinstance(value, (int, float))
              or not math.isfinite(value) or not -100 <= value <= 100):
            bad.append(f"{truncate(key, 24)} (value must be a number in [-100, 100])")
        else:
            bias[tid] = float(value)
    if bad:
        shown = "; ".join(bad[:8]) + (f"; ... ({len(bad)} in all)" if len(bad) > 8 else "")
        raise bad_request(f"logit_bias: invalid entries: {shown}", param="logit_bias")
    return bias


def common_sampling_kwargs(body: Any) -> dict[str, Any]:
    """The sampling fields both completion bodies share (OpenAI's and vLLM's names)."""
    return {
        "n": body.n, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
        "stop": body.stop, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "logit_bias": body.logit_bias,
        "top_k": body.top_k, "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
        "min_tokens": body.min_tokens, "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos, "skip_special_tokens": body.skip_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "prompt_logprobs": body.prompt_logprobs,
    }
