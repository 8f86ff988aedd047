"""The requests of a run, fixed by a seed before any is sent: prompts and output lengths.

Prompts are random token-id lists (`/v1/completions` accepts `prompt: [ids]`), so prompt
lengths are exact whatever the tokenizer; or random English-ish text (`--prompt-kind text`, or
any chat request), whose token count is only approximately the asked length (about one token
per short word). Output lengths are exact: `max_tokens` = the sampled length and
`ignore_eos: true` (a vLLM extension that moe-serve also accepts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from loadtest.loadgen.dists import LengthDist

_WORDS = [
    "the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "as", "with", "was", "by", "at", "be",
    "this", "are", "from", "or", "an", "have", "not", "but", "which", "one", "all", "were", "they", "we",
    "can", "more", "their", "when", "there", "has", "will", "would", "been", "if", "what", "so", "about",
    "into", "time", "than", "them", "some", "these", "only", "other", "new", "could", "its", "may", "two",
    "first", "then", "also", "after", "any", "made", "like", "our", "over", "such", "most", "where",
    "through", "even", "well", "much", "back", "way", "down", "good", "each", "work", "use", "long", "same",
    "must", "part", "right", "great", "high", "small", "large", "system", "data", "model", "token", "expert",
    "layer", "cache", "block", "queue", "batch", "server", "request", "stream", "route", "river", "stone",
    "cloud", "light",
]


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_len: int
    output_len: int
    prompt: list[int] | str

    def body(self, model: str, endpoint: str, *, temperature: float, extra: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": self.output_len, "temperature": temperature,
                                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if extra:
            body.update(extra)
        return body


def build_workload(n: int, prompt_len: LengthDist, output_len: LengthDist, *, seed: int, kind: str = "ids",
                   token_range: tuple[int, int] = (10, 1000), salt: str = "") -> list[RequestSpec]:
    """`n` request specs; the same arguments always give the same list.

    Lengths come from `seed` alone; prompt contents from `seed` and `salt`, so the points of a
    sweep (one salt each) get the same lengths but different prompts: no point hits the prefix
    cache with another point's prompts.
    """
    if kind not in ("ids", "text"):
        raise ValueError("prompt kind must be 'ids' or 'text'")
    lo, hi = token_range
    if not (0 <= lo < hi):
        raise ValueError("token range needs 0 <= LOW < HIGH")
    lengths = random.Random(seed)
    content = random.Random(f"{seed}/{salt}")
    specs = []
    for i in range(n):
        p, o = prompt_len.sample(lengths), output_len.sample(lengths)
        prompt: list[int] | str
        if kind == "ids":
            prompt = [content.randrange(lo, hi) for _ in range(p)]
        else:
            prompt = " ".join(content.choice(_WORDS) for _ in range(p))
        specs.append(RequestSpec(i, p, o, prompt))
    return specs
