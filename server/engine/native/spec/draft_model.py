"""`draft_model` proposer: a small model of the same tokenizer drafts k tokens autoregressively,
batched over the sequences, with its own paged KV cache (its own `BlockPool`, as many blocks as
the target's, prefix caching off) managed beside the target's.

Per sequence it remembers the tokens it has computed; each step it keeps the KV of the longest
prefix that still agrees with the sequence (rejected drafts are cut off, blocks past it go back),
computes the new tokens in one batched forward (the accepted drafts and the bonus token; the
whole prompt the first time or after a preemption), then k - 1 one-token steps. Greedy
requests draft the argmax (q one-hot: `Draft.probs` None); sampled ones draw from the draft's
softmax(logits / temperature) with the request's generator and hand q to the rejection sampler.
A sequence whose draft KV does not fit gets no drafts this step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.layers.paged import AttentionMetadata
from server.engine.native.kv_cache import BlockPool, KVCacheManager, SequenceBlocks
from server.engine.native.outputs import ScheduledSeq, SchedulerOutput
from server.engine.native.spec.config import SpeculativeConfig
from server.engine.native.spec.proposer import Draft, DraftRequest, Proposer, TargetHidden
from server.engine.native.step_inputs import StepBuffers

log = logging.getLogger(__name__)


class _NoPromptLogprobs:
    prompt_logprobs = None


@dataclass
class _DraftSeq:
    """What the draft model computed for one sequence (duck-types what StepBuffers reads)."""

    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    state_slots: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    params: Any = _NoPromptLogprobs
    num_inflight: int = 0  # async scheduling's counters (StepBuffers reads them): never in flight here
    num_pending: int = 0


class DraftModelProposer(Proposer):
    method = "draft_model"

    def __init__(self, config: SpeculativeConfig, target: Any, *, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int, kernels: Any = None):
        from models import load_model

        self.k = config.num_speculative_tokens
        dev, dtype = target.embed.weight.device, target.embed.weight.dtype
        self.model = load_model(config.model, dtype=str(dtype).replace("torch.", ""), device=str(dev),
                                progress=False, kernels=kernels)
        cfg = self.model.config
        if cfg.vocab_size != target.config.vocab_size:
            raise ValueError(f"--speculative-config: the draft model's vocabulary ({cfg.vocab_size}) differs from "
                             f"the target's ({target.config.vocab_size}); it must share the tokenizer")
        if cfg.hybrid:
            raise ValueError("--speculative-config: a draft model with linear-attention layers is not supported")
        self.model.apply_plan(self.model.kernel_plan.for_engine(placed=False, capacity_limited=False,
                                                                enforce_eager=True))
        self.device, self.block_size = dev, block_size
        self.kv_caches = self.model.allocate_kv_cache(num_blocks + 1, block_size)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching=False)
        self.kv = KVCacheManager(self.pool)
        self.pad_slot = num_blocks * block_size
        self.buffers = StepBuffers(max(max_num_batched_tokens, max_num_seqs), max_num_seqs,
                                   -(-max_model_len // block_size), dev)
        self.seqs: dict[int, _DraftSeq] = {}
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(0)

    # -- bookkeeping ------------------------------------------------------------------------
    def release(self, seq_id: int) -> None:
        st = self.seqs.pop(seq_id, None)
        if st is not None:
            self.kv.free(st.blocks)

    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def _sync(self, st: _DraftSeq, token_ids: list[int]) -> None:
        """Keep the KV of the longest computed prefix that agrees with `token_ids`."""
        n = min(st.num_computed, len(token_ids) - 1)
        if n:
            a = np.asarray(st.token_ids[:n])
            b = np.asarray(token_ids[:n])
            diff = np.flatnonzero(a != b)
            n = int(diff[0]) if diff.size else n
        st.num_computed = n
        st.token_ids = list(token_ids)
        self.kv.trim(st.blocks, n)

    # -- drafting ---------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest], target: TargetHidden | None) -> list[Draft]:
        drafts = [Draft() for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        live: list[int] = []
        for i, r in enumerate(requests):
            st = self.seqs.setdefault(r.seq.seq_id, _DraftSeq())
            self._sync(st, r.seq.token_ids)
            need = len(st.token_ids) - st.num_computed + r.max_drafts - 1
            if self.kv.allocate(st.blocks, st.num_computed, need, []):
                live.append(i)
            else:  # no room: no drafts, and nothing held for it
                self.release(r.seq.seq_id)
        for step in range(self.k):
            live = [i for i in live if requests[i].max_drafts > step]
            if not live:
                break
            states = [self.seqs[requests[i].seq.seq_id] for i in live]
            order = sorted(range(len(live)), key=lambda x: len(states[x].token_ids) - states[x].num_computed != 1)
            live, states = [live[x] for x in order], [states[x] for x in order]  # decodes first
            # (_DraftSeq has what StepBuffers reads of a Sequence)
            items = [ScheduledSeq(st, len(st.token_ids) - st.num_computed) for st in states]  # type: ignore[arg-type]
            logits = self._forward(items)  # [len(live), vocab]
            for row, i in enumerate(live):
                seq, st = requests[i].seq, states[row]
                st.num_computed = len(st.token_ids)
                if seq.params.greedy:
                    tok = int(logits[row].argmax())
                else:
                    q = (logits[row] / seq.params.temperature).softmax(-1)
                    tok = int(torch.multinomial(q, 1, generator=seq.generator or self.generator))
                    probs[i].append(q)
                drafts[i].tokens.append(tok)
                st.token_ids.append(tok)
        for i, r in enumerate(requests):
            if probs[i] and not r.seq.params.greedy:
                drafts[i].probs = torch.stack(probs[i])
        return drafts

    def _forward(self, items: list[ScheduledSeq]) -> torch.Tensor:
        """Last-position logits of each item: [len(items), vocab]."""
        inp = self.buffers.prepare(SchedulerOutput(scheduled=items), self.block_size, self.pad_slot)
        d = self.buffers.dev
        T = inp.num_tokens
        meta = AttentionMetadata(
            num_decodes=inp.num_decodes, query_start_loc=inp.query_start_loc, seq_lens=inp.seq_lens,
            slot_mapping=d["slots"][:T], block_tables=d["tables"][: inp.num_seqs, : inp.width],
            decode_seq_lens=d["seq_lens"][: inp.num_decodes], state_slots=d["state_slots"][: inp.num_seqs])
        hidden = self.model(d["ids"][:T], d["positions"][:T], meta, self.kv_caches, None)
        rows = d["logit_rows"][: inp.num_logit_rows]
        return self.model.compute_logits(hidden.index_select(0, rows))
