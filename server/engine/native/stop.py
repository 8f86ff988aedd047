"""`check_stop`: whether a sequence stops after the token it just appended, and why.

One function for every stop condition the scheduler applies (as vLLM v1's
`v1/core/sched/utils.py`), in this order of precedence:

1. the grammar matcher failed on the token: "error";
2. an EOS token of the model (unless `ignore_eos`), once `min_tokens` tokens exist: "stop";
3. one of `stop_token_ids`, once `min_tokens` tokens exist: "stop", stop_reason = the token;
4. a stop string (found by the output processor's detokenizer, which only looks once
   `min_tokens` tokens exist): "stop", stop_reason = the string;
5. the grammar's structure ended (`grammar_end`, "stop");
6. `max_tokens` or `max_model_len` reached: "length", or "stop" when a constrained output is a
   complete structure at that point.
"""

from __future__ import annotations

from server.engine.native.sequence import Sequence
from server.engine.structured.runtime import StructuredRuntime


def check_stop(seq: Sequence, token: int, *, eos_token_ids: tuple[int, ...], max_model_len: int,
               stop_str: str | None = None, grammar_end: str | None = None) -> tuple[str, int | str | None] | None:
    """(finish_reason, stop_reason) if `seq` stops after `token` (already appended), else None."""
    params = seq.params
    may_stop = seq.num_output >= params.min_tokens  # no stop of any kind before min_tokens
    if grammar_end == "error":
        return "error", None
    if not params.ignore_eos and token in eos_token_ids and may_stop:
        return "stop", None
    if may_stop and token in params.stop_token_set:
        return "stop", token
    if stop_str is not None:
        return "stop", stop_str
    if grammar_end is not None:
        return grammar_end, None
    if seq.num_output >= seq.state.max_tokens or len(seq.token_ids) >= max_model_len:
        # a structure that is complete at the budget's end stopped, one inside it ran out
        return ("stop" if StructuredRuntime.complete(seq.grammar) else "length"), None
    return None
