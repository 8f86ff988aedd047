"""Sequences: one per generated completion (a request with n > 1 forks into n of them)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.native.kv_cache import SequenceBlocks
from server.engine.request import EngineRequest


_SEQ_IDS = itertools.count()


def next_seq_id() -> int:
    """A fresh sequence id; ids grow with creation time (they break arrival-time ties)."""
    return next(_SEQ_IDS)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestState:
    """A request as the scheduler sees it (its output side: output_processor.RequestOutputState)."""

    request: EngineRequest
    max_tokens: int
    num_seqs_left: int
    # one per completion index (0..n-1): seeded generators, None when the request has no seed
    generators: list[torch.Generator | None] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)  # its sequences, in index order

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Sequence:
    seq_id: int
    index: int  # completion index within the request (0..n-1)
    state: RequestState
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    num_computed: int = 0  # tokens whose KV is in the cache
    status: SeqStatus = SeqStatus.WAITING
    routing_done: int = 0  # tokens whose expert choices were recorded (return_routing)
    needs_fork: bool = False  # the shared prompt sequence of an n > 1 request
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_ids: list[int] = field(default_factory=list)  # == token_ids[num_prompt_tokens:], kept as it grows
    sampling_cache: dict = field(default_factory=dict)  # the sampler's per-sequence tensors
    grammar: Any = None  # structured output: its GrammarState (server/engine/structured/state.py)
    # hybrid models: the state slots it holds (state_slots.py); the first is its own, the others
    # (an n > 1 prompt sequence's) go to its completions when it forks
    state_slots: list[int] = field(default_factory=list)
    # speculative decoding (spec/): drafts proposed for the next step, their draft
    # probabilities ([k, vocab] or None: one-hot) and, for structured outputs, the grammar
    # bitmask of each of the k + 1 verified positions ([k + 1, words] int32)
    spec_tokens: list[int] = field(default_factory=list)
    spec_probs: Any = None
    spec_masks: Any = None

    def clear_spec(self) -> None:
        self.spec_tokens, self.spec_probs, self.spec_masks = [], None, None
    # async scheduling (async_step.py): tokens scheduled into a step whose results the host has
    # not applied yet, and sampled tokens the device holds but the host does not know yet (0 or 1;
    # the next step reads it from the device). Both stay 0 without async scheduling.
    num_inflight: int = 0
    num_pending: int = 0

    @property
    def request(self) -> EngineRequest:
        return self.state.request

    @property
    def params(self):
        return self.state.request.sampling_params

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed - self.num_inflight

    @property
    def needs_prompt_outputs(self) -> bool:
        """Prompt logprobs or prompt routing were asked: every prompt position must run through
        the model, so the prefix cache is not used for this sequence (as vLLM does)."""
        return self.params.prompt_logprobs is not None or self.request.return_routing

    @property
    def state_slot(self) -> int | None:
        return self.state_slots[0] if self.state_slots else None

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def sort_key(self, policy: str) -> tuple:
        """Lower runs first; the highest key is preempted first."""
        if policy == "priority":
            return (self.request.priority, self.request.arrival_time, self.seq_id)
        return (self.request.arrival_time, self.seq_id)
