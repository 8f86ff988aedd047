"""Token sampling for the native engine (vLLM v1 semantics).

Per step the runner hands the sampler the last-position logits of every running sequence
(`[num_rows, vocab]`) and one `SamplingRow` per sequence. Processing order:

0. structured output: rows with a grammar get their token bitmask (disallowed tokens -inf;
   server/engine/structured/), one batched op over those rows only;
1. repetition penalty over prompt + output tokens (HF / vLLM: divide positive logits,
   multiply non-positive ones); frequency and presence penalties over output tokens only
   (OpenAI: `logit -= freq * count + presence * (count > 0)`);
2. `logit_bias` (added);
3. `min_tokens`: while fewer than `min_tokens` tokens were generated, the row's EOS ids and
   `stop_token_ids` are set to -inf (after the bias, so no bias can bring them back);
4. greedy rows (`temperature < 1e-5`) take the argmax;
5. other rows: divide by temperature, `min_p`, `top_k`, `top_p`, then sample with the
   exponential race `argmax(probs / q)`, `q ~ Exp(1)` (one draw per vocabulary entry).

Logprobs are vLLM v1's default "raw_logprobs": log_softmax of the logits as given, before any
of the processing above.

Seeds: a seeded row draws its `q` (shape `[vocab]`, every step it samples) from its own
generator, so its tokens do not depend on the other rows of the batch or its position.
All processing is per-row arithmetic, so a row's processed logits do not depend on the batch
either. Unseeded rows share the sampler's generator and are drawn in one batched op.

Cost: each feature touches only the rows that use it. Penalties, bias and min_tokens are
sparse (gather / write the (row, token) entries concerned, O(tokens), no vocab-wide passes);
temperature / min_p / top_k work on the sampled rows; only top_p rows pay for a full sort
(top_k alone uses `topk`). A batch of plain greedy rows costs a single argmax. The input
logits are never modified (processing works on one float32 copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.native.logprobs import compute_logprobs
from server.engine.native.warp import warp_logits
from server.engine.request import Logprob, SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None  # per-sequence generator, set when params.seed is not None
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (before this step)
    eos_token_ids: tuple[int, ...]  # model's EOS ids (empty if ignore handled by caller)
    # per-sequence tensors built once and reused every step (the caller keeps the dict with
    # the sequence): logit-bias ids/values, ids banned before min_tokens, the prompt ids
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def cached(self, key: str, build) -> torch.Tensor:
        t = self.cache.get(key)
        if t is None:
            t = self.cache[key] = build()
        return t


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[Logprob | None]  # per row; None unless params.logprobs is not None
    tokens: torch.Tensor | None = None  # [rows] the same ids on the device (async scheduling feeds them on)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", seed: int = 0):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = self.make_generator(seed, 0, self.device)  # for unseeded rows

    @staticmethod
    def make_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
        """Generator for sequence `index` of a request with `seed`.

        As vLLM's parallel sampling: sequence i is seeded with `seed + i` (so n > 1
        sequences differ and sequence 0 uses the request's seed), taken modulo 2**64.
        """
        g = torch.Generator(device=device)
        g.manual_seed((seed + index) % (1 << 64))
        return g

    # -- main entry -------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 mask: tuple[torch.Tensor, torch.Tensor] | None = None) -> SamplerOutput:
        """`mask`: structured output, (row indices [m], token bitmask [m, ceil(vocab / 32)] int32):
        those rows' disallowed tokens are -inf before anything else (logprobs included, as vLLM);
        the other rows are untouched."""
        num_rows = len(rows)
        if logits.dim() != 2 or logits.shape[0] != num_rows:
            raise ValueError(f"logits must be [{num_rows}, vocab], got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, vocab_size is {self.vocab_size}")
        if num_rows == 0:
            return SamplerOutput([], [])
        raw = logits[:, : self.vocab_size]  # [num_rows, vocab]; drops padded vocab columns
        if mask is not None:
            from server.engine.structured.mask import apply_bitmask  # xgrammar: imported once needed

            raw = raw.to(torch.float32).contiguous() if raw.dtype != torch.float32 else raw.clone()
            apply_bitmask(raw, *mask)  # the caller's logits stay unmodified
        dev = raw.device

        # Classify rows (loops over rows, never over the vocabulary).
        greedy_rows: list[int] = []
        random_rows: list[int] = []
        for i, r in enumerate(rows):
            (greedy_rows if r.params.greedy else random_rows).append(i)

        if not random_rows and not any(_needs_processing(r) for r in rows):
            tokens = raw.argmax(dim=-1)  # [num_rows]  fast path: plain greedy batch
        else:
            x = self.process_logits(raw, rows)  # [num_rows, vocab]
            if not random_rows:
                tokens = x.argmax(dim=-1)
            else:
                tokens = torch.empty(num_rows, dtype=torch.long, device=dev)
                if greedy_rows:
                    g_idx = torch.tensor(greedy_rows, device=dev)
                    tokens[g_idx] = x[g_idx].argmax(dim=-1)
                r_idx = torch.tensor(random_rows, device=dev)
                y = x if len(random_rows) == num_rows else x[r_idx]  # [num_random, vocab]
                sampled = [rows[i] for i in random_rows]
                y = warp_logits(y, [r.params for r in sampled])
                tokens[r_idx] = self._race(y, [r.generator for r in sampled])

        token_list: list[int] = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(raw, tokens, rows), tokens)

    # -- logits processing ------------------------------------------------------------------
    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Penalties, logit_bias and min_tokens applied: a new float32 [num_rows, vocab] tensor.

        What greedy rows take the argmax of (and what temperature etc. then apply to).
        """
        pen = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
        bias = [i for i, r in enumerate(rows) if r.params.logit_bias]
        mt = [i for i, r in enumerate(rows) if _min_tokens_active(r)]
        x = logits[:, : self.vocab_size].to(torch.float32, copy=True)  # [num_rows, vocab]
        if pen:
            self._apply_penalties(x, rows, pen)
        if bias:
            self._apply_logit_bias(x, rows, bias)
        if mt:
            self._apply_min_tokens(x, rows, mt)
        return x

    # The three below work in place on x [num_rows, vocab], touching only the (row, token)
    # entries concerned: O(tokens), never a pass over the whole vocabulary.
    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
        dev, vocab = x.device, x.shape[1]
        rep_rows = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
        if rep_rows:
            # every (row, token) seen in prompt or output; duplicates are harmless: each copy
            # is read before any is written and all copies write the same value
            r, t = _row_token_ids(rows, rep_rows, with_prompt=True, device=dev)  # [T], [T]
            penalty = torch.ones(x.shape[0], dtype=torch.float32, device=dev)  # [num_rows]
            penalty[torch.tensor(rep_rows, device=dev)] = torch.tensor(
                [rows[i].params.repetition_penalty for i in rep_rows], dtype=torch.float32, device=dev
            )
            v, pen = x[r, t], penalty[r]  # [T], [T]
            x[r, t] = torch.where(v > 0, v / pen, v * pen)
        fp_rows = [i for i in idx if rows[i].params.frequency_penalty or rows[i].params.presence_penalty]
        if fp_rows:
            r, t = _row_token_ids(rows, fp_rows, with_prompt=False, device=dev)
            if r.numel():
                keys, counts = torch.unique(r * vocab + t, return_counts=True)  # [U], [U] exact counts
                r, t = keys // vocab, keys % vocab
                freq = torch.zeros(x.shape[0], dtype=torch.float32, device=dev)  # [num_rows]
                pres = torch.zeros(x.shape[0], dtype=torch.float32, device=dev)  # [num_rows]
                fp_t = torch.tensor(fp_rows, device=dev)
                freq[fp_t] = torch.tensor([rows[i].params.frequency_penalty for i in fp_rows], device=dev)
                pres[fp_t] = torch.tensor([rows[i].params.presence_penalty for i in fp_rows], device=dev)
                x[r, t] = x[r, t] - (freq[r] * counts + pres[r])

    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
        dev = x.device

        def build(p: SamplingParams) -> torch.Tensor:  # [2, n]: token ids, values
            return torch.tensor([list(p.logit_bias.keys()), list(p.logit_bias.values())],
                                dtype=torch.float32, device=dev)

        parts = [rows[i].cached("logit_bias", lambda p=rows[i].params: build(p)) for i in idx]
        r, pairs = _rows_of(parts, idx, dev), torch.cat(parts, dim=1)  # [N], [2, N]
        x.index_put_((r, pairs[0].long()), pairs[1], accumulate=True)

    @staticmethod
    def _apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
        dev = x.device

        def build(r: SamplingRow) -> torch.Tensor:  # [n] EOS and stop token ids
            return torch.tensor(sorted(set(r.eos_token_ids) | r.params.stop_token_set), dtype=torch.long, device=dev)

        parts = [rows[i].cached("banned", lambda r=rows[i]: build(r)) for i in idx]
        x[_rows_of(parts, idx, dev), torch.cat(parts)] = _NEG_INF

    # -- random sampling ----------------------------------------------------------------------
    def _race(self, y: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exponential race: argmax(probs / q), q ~ Exp(1), is a draw from softmax(y) [n, vocab].

        q = -log(u), u ~ U[0, 1): cheaper than `exponential_` on CPU (docs/benchmarks.md, section
        "Numbers behind code choices"). u < 1 always, so q > 0 and no 0/0 = NaN can make a
        zero-probability token win; u == 0 gives q = inf, i.e. that token scores 0.
        """
        n = y.shape[0]
        probs = y.softmax(dim=-1)  # [n, vocab]
        seeded = [j for j, g in enumerate(generators) if g is not None]
        u = torch.empty_like(probs)  # [n, vocab]
        if len(seeded) < n:
            u.uniform_(generator=self.generator)
        for j in seeded:  # a fixed [vocab] draw from each seeded row's own generator
            u[j].uniform_(generator=generators[j])
        q = u.log_().neg_()  # [n, vocab] ~ Exp(1)
        return probs.div_(q).argmax(dim=-1)  # [n]

    # -- logprobs -------------------------------------------------------------------------------
    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]) -> list[Logprob | None]:
        out: list[Logprob | None] = [None] * len(rows)
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not lp_rows:
            return out
        ks = [rows[i].params.logprobs for i in lp_rows]
        if len(lp_rows) == len(rows):
            sel_logits, sel_tokens = raw, tokens
        else:
            idx = torch.tensor(lp_rows, device=raw.device)
            sel_logits, sel_tokens = raw[idx], tokens[idx]
        for i, k, lp in zip(lp_rows, ks, compute_logprobs(sel_logits, sel_tokens, max(ks))):
            del lp.top[k:]
            out[i] = lp
        return out


def _needs_processing(r: SamplingRow) -> bool:
    return _has_penalty(r.params) or bool(r.params.logit_bias) or _min_tokens_active(r)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _min_tokens_active(r: SamplingRow) -> bool:
    return len(r.output_token_ids) < r.params.min_tokens and bool(r.eos_token_ids or r.params.stop_token_ids)


def _rows_of(parts: list[torch.Tensor], idx: list[int], device: torch.device) -> torch.Tensor:
    """Row index of every element of `parts` (part j belongs to row idx[j]): [sum of lengths]."""
    lengths = torch.tensor([p.shape[-1] for p in parts], device=device)
    return torch.repeat_interleave(torch.tensor(idx, device=device), lengths)


def _row_token_ids(
    rows: list[SamplingRow], idx: list[int], with_prompt: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every output (and prompt) token of rows idx, as two [T] tensors.
    The prompt part is built once per sequence; only the output ids are new each step."""
    parts: list[torch.Tensor] = []
    for i in idx:
        r = rows[i]
        out = torch.tensor(r.output_token_ids, dtype=torch.long, device=device)  # [n_out]
        if with_prompt:
            prompt = r.cached("prompt", lambda r=r: torch.tensor(r.prompt_token_ids, dtype=torch.long, device=device))
            out = torch.cat([prompt, out])
        parts.append(out)
    return _rows_of(parts, idx, device), torch.cat(parts)
