"""How many prompt logprob entries one response may carry, and where they go.

Prompt logprobs cost one prefill to compute, but the answer repeats them: vLLM's completions
API (which this server follows) puts a prompt's `prompt_logprobs` in each of its `n` choices,
and `echo` with `logprobs` puts the prompt's tokens, with their top alternatives, in each
choice's `logprobs`. So a small request (1,350 prompt tokens, n 64, top 20) made an answer of
over a hundred megabytes (docs/benchmarks.md, section "One big answer (prompt logprobs)",
measured by `python -m loadtest big-answer`). The entries an answer would hold, n x prompt
tokens x (top + 1) summed over the prompts (the +1: the prompt token's own entry), are capped
at MAX_PROMPT_LOGPROB_ENTRIES; a request over it is a 400 naming the limit. With n = 1 and top
20 that still allows prompts of 12,000 tokens.

Where they go: completions put a prompt's `prompt_logprobs` in every one of its choices, as
vLLM does, built once per prompt; streamed (vLLM streams none), once per prompt, on its first
chunk. Chat puts them once per response (`prompt_logprobs` beside `choices`), as vLLM does.
"""

from __future__ import annotations

from server.api.errors import bad_request

MAX_PROMPT_LOGPROB_ENTRIES = 1 << 18  # 262,144


def check_prompt_logprob_entries(prompt_lens: list[int], copies: int, prompt_logprobs: int | None,
                                 echo_logprobs: int | None = None) -> None:
    """400 when the answer would hold more prompt logprob entries than the limit: `copies` is
    how many times each prompt's entries are sent (n for completions, 1 for chat),
    `echo_logprobs` the completions' `logprobs` when the prompt is echoed."""
    per_token = sum(k + 1 for k in (prompt_logprobs, echo_logprobs) if k is not None)
    tokens = sum(prompt_lens)
    entries = copies * tokens * per_token
    if entries <= MAX_PROMPT_LOGPROB_ENTRIES:
        return
    param = "prompt_logprobs" if prompt_logprobs is not None else "logprobs"
    tops = " + ".join(f"({k} + 1)" for k in (prompt_logprobs, echo_logprobs) if k is not None)
    raise bad_request(
        f"{param}: this request would return {entries} prompt logprob entries ({copies} "
        f"{'copies' if copies > 1 else 'copy'} x {tokens} prompt tokens x {tops}); the limit is "
        f"{MAX_PROMPT_LOGPROB_ENTRIES}. Lower n or {param}, or send a shorter prompt.", param=param,
        code="prompt_logprobs_limit_exceeded")
