"""The glue between the engine core and a proposer (the interface: proposer.py).

`SpecDecoder`, owned by `EngineCore` when `--speculative-config` is set:
- `propose(running, target)` after each step: for every running sequence that decodes next
  (one uncomputed token, not an n > 1 prompt about to fork), asks the proposer for up to k
  drafts, clamped to the room left before max_tokens / max_model_len; a structured-output
  sequence's drafts are walked through a fork of its grammar matcher and cut at the first
  token the grammar rejects, and the bitmask of each of the k + 1 positions is kept for the
  verify step (in the reasoning part, before the grammar's gate, positions are unmasked). With `disable_by_batch_size`, nothing is drafted while that many sequences run.
- `target_hidden(batch, result)`: the `TargetHidden` of the step for proposers that want it.
- `record(batch, result, stats)`: the step's acceptance counts into `IterationStats`.
The scheduler turns drafts into k + 1 query tokens (scheduler.py), the runner verifies them
(verify.py), and the scheduler keeps the accepted tokens' KV (update_from_output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from server.engine.native.outputs import ModelOutput, SchedulerOutput
from server.engine.native.sequence import Sequence
from server.engine.native.spec.config import SpeculativeConfig
from server.engine.native.spec.ngram import NgramProposer
from server.engine.native.spec.proposer import DraftRequest, Proposer, TargetHidden, scratch_blocks
from server.engine.stats import IterationStats

log = logging.getLogger(__name__)


def _ngram(config: SpeculativeConfig, target: Any, args: dict[str, Any]) -> Proposer:
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)


def _draft_model(config: SpeculativeConfig, target: Any, args: dict[str, Any]) -> Proposer:
    from server.engine.native.spec.draft_model import DraftModelProposer

    return DraftModelProposer(config, target, **args)


def _eagle3(config: SpeculativeConfig, target: Any, args: dict[str, Any]) -> Proposer:
    from server.engine.native.spec.mtp import Eagle3Proposer

    return Eagle3Proposer(config, target, **args)


def _mtp(config: SpeculativeConfig, target: Any, args: dict[str, Any]) -> Proposer:
    from server.engine.native.spec.mtp import MTPProposer

    return MTPProposer(config, target, **args)


# method -> factory(config, target model, engine args: num_blocks, block_size, max_model_len,
# max_num_seqs, max_num_batched_tokens, kernels); mtp / eagle3 register theirs here
PROPOSERS: dict[str, Callable[[SpeculativeConfig, Any, dict[str, Any]], Proposer]] = {
    "ngram": _ngram,
    "draft_model": _draft_model,
    "mtp": _mtp,
    "eagle3": _eagle3,
}


def check_method(config: SpeculativeConfig) -> None:
    """Refuse a method without a proposer (before any model is loaded)."""
    if config.method not in PROPOSERS:
        raise ValueError(f"--speculative-config: method {config.method!r} needs a proposer that this build "
                         f"does not have yet (available: {', '.join(PROPOSERS)})")


def draft_kv_bytes(config: SpeculativeConfig, target: Any, block_size: int, max_num_seqs: int) -> tuple[int, int]:
    """What a proposer's own KV cache takes from `--kv-cache-memory`: (bytes it adds to each of
    the target's blocks, bytes it holds besides). MTP layers and EAGLE-3 heads index their cache
    by the target's block tables (a block of theirs per target block) plus scratch blocks for
    the chained drafts (`scratch_blocks` per running sequence); a draft model has its own pool of
    as many blocks as the target's, plus one pad block. n-gram: nothing."""
    if config.method == "ngram":
        return 0, 0
    elem = target.embed.weight.element_size()
    if config.method == "mtp":
        mtp = getattr(target, "mtp", None)
        per_block = mtp.kv_bytes_per_block(block_size) if mtp is not None else 0
    elif config.method == "eagle3":
        from models.eagle3 import Eagle3Config

        head = Eagle3Config.from_dir(str(config.model))
        per_block = block_size * 2 * head.num_kv_heads * head.head_dim * elem
    else:  # draft_model: its config as load_model reads it (a GGUF file's from its metadata)
        from models.gguf_loader import GGUFCheckpoint, gguf_path
        from models.hf_config import load_config

        file = gguf_path(str(config.model))
        if file is None:
            cfg = load_config(str(config.model))
        else:
            gguf = GGUFCheckpoint(file)
            try:
                cfg = gguf.config()
            finally:
                gguf.close()
        per_block = block_size * cfg.kv_bytes_per_token(elem)
        return per_block, per_block  # + its pad block
    return per_block, max_num_seqs * scratch_blocks(config.num_speculative_tokens, block_size) * per_block


def build_proposer(config: SpeculativeConfig, target: Any, **args: Any) -> Proposer:
    check_method(config)
    return PROPOSERS[config.method](config, target, args)


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int, vocab_size: int):
        self.config, self.proposer = config, proposer
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.totals = {"drafts": 0, "draft_tokens": 0, "accepted": 0}  # since start (tests, logs)

    # -- after a step -------------------------------------------------------------------
    def propose(self, running: list[Sequence], target: TargetHidden | None) -> None:
        disabled = self.config.disable_by_batch_size is not None and len(running) >= self.config.disable_by_batch_size
        requests = []
        for seq in running:
            if seq.spec_tokens:
                seq.clear_spec()
            if disabled or seq.num_uncomputed != 1 or seq.needs_fork or seq.finish_reason:
                continue
            g = seq.grammar
            if g is not None and g.failed:
                continue
            room = min(self.k, seq.state.max_tokens - seq.num_output - 1, self.max_model_len - len(seq.token_ids) - 1)
            if room >= 1:
                requests.append(DraftRequest(seq, room))
        if not requests and (target is None or not self.proposer.wants_hidden_states):
            return
        for r, d in zip(requests, self.proposer.propose(requests, target), strict=True):
            tokens = list(d.tokens[: r.max_drafts])
            seq = r.seq
            if tokens and seq.grammar is not None:
                tokens, seq.spec_masks = self._grammar_walk(seq.grammar, tokens, seq.output_ids)
            if tokens:
                seq.spec_tokens = tokens
                seq.spec_probs = None if d.probs is None else d.probs[: len(tokens)]

    def _grammar_walk(self, state: Any, tokens: list[int], output_ids: list[int]
                      ) -> tuple[list[int], torch.Tensor | None]:
        """The drafts up to the first one the grammar rejects, and the bitmask of every verified
        position ([kept + 1, words]; rows past a terminating token allow everything; None when
        every position is in the reasoning part). A sequence still in its reasoning part (the
        state's gate, structured/state.py) drafts freely: positions before the gate's last token
        allow everything, as plain decoding does, and the grammar applies from the position
        after it, on a fork of the matcher (which has seen no token yet)."""
        m = state.matcher.fork()
        masks = torch.full((len(tokens) + 1, self.words), -1, dtype=torch.int32)
        active, gate = state.active, state.structure.gate
        gated_from = 0 if active else None  # the first position the grammar masks
        out = list(output_ids) if not active else []
        kept = 0
        for i, t in enumerate(tokens):  # at most k drafts
            if not active:  # the reasoning part: free, watching for the gate
                kept += 1
                out.append(t)
                if len(out) >= len(gate) and tuple(out[-len(gate):]) == gate:
                    active, gated_from = True, i + 1
                continue
            m.fill_next_token_bitmask(masks, i)
            if not m.accept_token(t):
                break
            kept += 1
            if m.is_terminated():
                break
        if gated_from is None:
            return tokens[:kept], None
        if not m.is_terminated():
            m.fill_next_token_bitmask(masks, kept)
        return tokens[:kept], masks[: kept + 1]

    def target_hidden(self, batch: SchedulerOutput, result: ModelOutput) -> TargetHidden | None:
        """Before the scheduler moves the sequences on (positions are the pre-step ones)."""
        if result.hidden is None:
            return None
        rows, positions, seqs = {}, {}, {}
        for j, item in enumerate(batch.scheduled):
            kept = item.num_new - item.num_spec + result.num_accepted.get(j, 0)
            rows[item.seq.seq_id] = (result.token_offsets[j], kept)
            positions[item.seq.seq_id] = item.seq.num_computed
            seqs[item.seq.seq_id] = item.seq
        # the residual stream entering the proposer's aux_hidden_layers (the model's own capture)
        return TargetHidden(result.hidden, rows, positions, list(result.aux or ()), seqs=seqs)

    # -- stats ---------------------------------------------------------------------------
    def record(self, batch: SchedulerOutput, result: ModelOutput, stats: IterationStats) -> None:
        per_pos = [0] * self.k
        for j, item in enumerate(batch.scheduled):
            if not item.num_spec:
                continue
            a = result.num_accepted[j]
            stats.spec_num_drafts += 1
            stats.spec_num_draft_tokens += item.num_spec
            stats.spec_num_accepted_tokens += a
            for i in range(a):
                per_pos[i] += 1
        if stats.spec_num_drafts:
            stats.spec_accepted_per_pos = per_pos
            self.totals["drafts"] += stats.spec_num_drafts
            self.totals["draft_tokens"] += stats.spec_num_draft_tokens
            self.totals["accepted"] += stats.spec_num_accepted_tokens


def distinct_experts(batch: SchedulerOutput, result: ModelOutput, stats: IterationStats) -> None:
    """A step without prefill tokens: the distinct experts its tokens touched, per MoE layer,
    labelled "verify" when some sequence verified drafts, else "decode"."""
    if result.seq_expert_counts is None or not batch.scheduled:
        return
    if any(item.num_new - item.num_spec != 1 for item in batch.scheduled):
        return
    stats.decode_step_kind = "verify" if any(item.num_spec for item in batch.scheduled) else "decode"
    stats.distinct_experts = (result.seq_expert_counts.sum(0) > 0).sum(-1).tolist()  # [L]
