"""The data the scheduler, the runner and the output processor hand each other in one step:
plain dataclasses, no behaviour beyond derived properties, imported by all three (and by
nothing they import), so that none of them depends on another for a type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from server.engine.native.sequence import Sequence
    from server.engine.request import Logprob


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens to compute this step (with num_spec drafted tokens after its last one)
    num_spec: int = 0  # speculative decoding: drafts verified this step (seq.spec_tokens[:num_spec])

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token (so a new one is sampled)."""
        seq = self.seq  # (num_inflight / num_pending: async scheduling, before this step is launched)
        return (seq.num_computed + seq.num_inflight + self.num_new - self.num_spec
                == len(seq.token_ids) + seq.num_pending)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the forward
    state_copies: list[tuple[int, int]] = field(default_factory=list)  # state slots (src, dst), forked sequences
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelOutput:
    routing: torch.Tensor | None  # [num_tokens, num_moe_layers, top_k] expert ids
    token_offsets: list[int]  # [num_scheduled + 1] start of each sequence's tokens
    # position in `scheduled` -> its sampled tokens (n for a forking prompt sequence, else one)
    sampled_token_ids: dict[int, list[int]] = field(default_factory=dict)
    sampled_logprobs: dict[int, list[Logprob | None]] = field(default_factory=dict)  # as the tokens
    # position in `scheduled` -> logprobs of the prompt tokens after those computed this step
    prompt_logprobs: dict[int, list[Logprob]] = field(default_factory=dict)
    # [num_scheduled, num_moe_layers, num_experts] on the CPU: each sequence's expert choices this step
    seq_expert_counts: torch.Tensor | None = None
    graph_bucket: int | None = None  # the CUDA-graph bucket that ran this step, None when eager
    # [num_tokens, num_moe_layers, top_k]: router weights (only when a request returns routing)
    # and assignments dropped over expert capacity (only with --expert-capacity-factor)
    routing_weights: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    # [num_tokens, num_moe_layers, top_k] bool: assignments to zero-computation experts (LongCat)
    zero_expert: torch.Tensor | None = None
    # speculative decoding: position in `scheduled` -> drafts accepted (its sampled tokens are
    # those drafts then one more); `hidden` [num_tokens, hidden] the step's final hidden states,
    # kept only when a proposer wants them
    num_accepted: dict[int, int] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    # [num_tokens, hidden] per layer of the model's aux_hidden_layers (the residual stream entering
    # it: EAGLE-3), when kept
    aux: list[torch.Tensor] | None = None
