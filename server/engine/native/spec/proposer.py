"""The proposer interface of speculative decoding: what a drafting method implements.

The engine (`EngineCore`, with `spec/engine.py` `SpecDecoder`) calls a proposer once per step,
after the step's tokens were appended, for the running sequences that decode next:

    drafts = proposer.propose(requests, target)     # list[Draft], one per DraftRequest

- `requests[i].seq` is the `Sequence` (server/engine/native/sequence.py): `token_ids` is the
  prompt + output so far (its last token not yet computed by the target), `seq_id` identifies
  it across steps, `params` its SamplingParams (greedy or not: `params.greedy`,
  `params.temperature`), `seq.generator` its seeded torch.Generator (None: unseeded; a proposer
  that samples should use it so seeded requests stay reproducible);
  `requests[i].max_drafts` (>= 1) caps how many tokens it may propose (k, the room left before
  max_tokens / max_model_len). Returning fewer (or none) is always allowed.
- `Draft.tokens`: the proposed continuation; `Draft.probs`: `[len(tokens), vocab]` float32, the
  distribution each token was drawn from (q of the rejection sampler), or None when the draft
  is deterministic (n-gram, greedy drafts): q is then one-hot at the token. With q given, a
  sampled request keeps the target distribution exactly (accept with min(1, p/q), else
  resample from norm(max(0, p - q))); greedy requests only compare tokens.
- `target` (a `TargetHidden`, only when the proposer sets `wants_hidden_states = True`): the
  target model's hidden states of the step that just ran, for MTP / EAGLE-3 heads:
  `hidden` [T, hidden] are the forward's output (after the final norm, what `compute_logits`
  reads), `aux` the residual stream entering each decoder layer listed in `aux_hidden_layers`
  (EAGLE-3: e.g. (2, L // 2, L - 3), vLLM's convention; distinct and increasing; kept by the
  model's forward, `MoEForCausalLM.aux_hidden_layers`, so decode steps then run without CUDA
  graphs), same rows as `hidden`; `rows[seq_id] = (first, count)` are the rows of `hidden` that
  belong to that sequence and whose tokens stay (a verify step's rejected drafts are cut off):
  row `first + i` holds the state at position `positions[seq_id] + i`, whose next token is
  `seq.token_ids[positions[seq_id] + i + 1]` (tests/engine/test_spec_decode.py checks this
  mapping). The tensors belong to that step: copy what you keep. A sequence absent from `rows`
  computed nothing this step (it may still be asked to propose: it was not scheduled, e.g. the
  token budget ran out; use what you kept, or propose nothing); `seqs[seq_id]` its Sequence.
  A proposer that wants hidden states is called after every step that kept them, with no
  requests too (prefill chunks), so it can run its layers over every row (MTP keeps its KV for
  the whole sequence).
- `release(seq_id)`: the sequence finished, was aborted or preempted; drop whatever the
  proposer keeps for it (its own paged KV blocks: a model-based proposer owns a pool of its own,
  e.g. `spec/draft_model.py` keeps a `BlockPool` + `KVCacheManager` over its own KV tensors and
  recomputes from `seq.token_ids` after a preemption). `close()` at shutdown.
- `num_free_blocks()` / `num_blocks()`: a proposer with its own KV pool reports it (tests check
  that nothing leaks); proposers without one return 0.

Proposers are built by `spec/engine.py` `build_proposer(config, target_model, ...)` from the
`--speculative-config` method; mtp / eagle3 are parsed but refused at startup until a proposer
for them is registered in `PROPOSERS` (method -> factory(config, target_model, engine_args)).
The engine does the rest: it clamps drafts to `max_drafts`, truncates them at the first token a
structured-output grammar rejects, schedules a sequence with k drafts as k + 1 query tokens in
the step's one batched forward, verifies them and frees the KV blocks of rejected positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from server.engine.native.sequence import Sequence


def scratch_blocks(k: int, block_size: int) -> int:
    """Blocks past a sequence's own that an MTP layer / EAGLE-3 head writes its chained drafts' KV to."""
    return -(-k // block_size) + 1


@dataclass
class DraftRequest:
    seq: Sequence
    max_drafts: int


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # [len(tokens), vocab] float32 q; None: one-hot (deterministic)


@dataclass
class TargetHidden:
    hidden: torch.Tensor  # [T, hidden]: the step's final hidden states (after the final norm)
    rows: dict[int, tuple[int, int]]  # seq_id -> (first row, count) of its kept tokens
    positions: dict[int, int]  # seq_id -> the position of its row `first`
    aux: list[torch.Tensor] = field(default_factory=list)  # [T, hidden] per aux_hidden_layers entry (its input)
    seqs: dict[int, Sequence] = field(default_factory=dict)  # seq_id -> its Sequence (every row's owner)


class Proposer:
    """Base class; subclasses implement `propose`."""

    method: str = ""
    wants_hidden_states: bool = False  # receive TargetHidden (MTP, EAGLE-3)
    aux_hidden_layers: tuple[int, ...] = ()  # decoder layers whose inputs go into TargetHidden.aux

    def propose(self, requests: list[DraftRequest], target: TargetHidden | None) -> list[Draft]:
        raise NotImplementedError

    def release(self, seq_id: int) -> None:
        """Forget a sequence (finished, aborted or preempted)."""

    def num_blocks(self) -> int:
        return 0

    def num_free_blocks(self) -> int:
        return 0

    def close(self) -> None:
        pass
