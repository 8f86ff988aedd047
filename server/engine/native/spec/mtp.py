"""`mtp` proposer: the checkpoint's own multi-token-prediction layers draft (models/mtp.py; the
target is loaded with `load_model(..., mtp=True)`, which server/engine/factory.py asks for when
`--speculative-config` names method mtp).

The MTP layer at position t reads the target's final hidden state h_t and the token at t+1, and
predicts the token at t+2. Its attention keeps a paged KV cache of its own tensors indexed by the
target's block tables (the MTP entry of position t sits in the slot of the target's position t),
so prefix-cache hits, chunked prefill and preemption need no bookkeeping here: a cached block
holds the MTP entries computed when it was filled.

Each engine step (spec/engine.py calls `propose` after every step that kept hidden states):
1. ingest: for every sequence of the step, the MTP layer runs over the rows the target kept
   (prefill chunks, or the accepted drafts plus the bonus token; the same positions, the tokens
   one further), in one batched forward, writing its KV; the last row of a sequence that decodes
   next gives the logits of the first draft;
2. chain (k > 1): draft s + 1 comes from the MTP layer (layer s % n) at the next position, fed the
   previous draft and the previous MTP output hidden state, one batched one-token step per draft.
   These speculative entries are written past the sequence's computed tokens: into its own
   partially filled last block, or into scratch blocks past the target's pool; the next step's
   ingest overwrites them with entries made from the target's hidden states.
Greedy requests draft the argmax (q one-hot); sampled ones draw from softmax(logits / T) with the
request's generator and hand q to the rejection sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from models.layers.paged import AttentionMetadata
from server.engine.native.spec.config import SpeculativeConfig
from server.engine.native.spec.proposer import Draft, DraftRequest, Proposer, TargetHidden, scratch_blocks


class MTPProposer(Proposer):
    method = "mtp"
    wants_hidden_states = True

    def __init__(self, config: SpeculativeConfig, target: Any, *, num_blocks: int, block_size: int,
                 max_num_seqs: int, **_: Any):
        mtp = getattr(target, "mtp", None)
        if mtp is None:
            raise ValueError("--speculative-config: method mtp needs the model loaded with its MTP layers")
        self.mtp, self.target = mtp, target
        self.k = config.num_speculative_tokens
        self.block_size = block_size
        self.pool_blocks = num_blocks  # the target's; the scratch blocks come after them
        # scratch blocks for the chained drafts past a sequence's blocks: per sequence of a step
        self.scratch_per_seq = scratch_blocks(self.k, block_size)
        self.rows_max = self.k + 1  # ingested as one-token rows up to this many tokens (_meta)
        self.kv_caches = mtp.allocate_kv_cache(num_blocks + max_num_seqs * self.scratch_per_seq, block_size)
        self.device = target.embed.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0)
        self.totals = {"ingested_tokens": 0}

    def _meta(self, lens: list[int], starts: list[int], tables: list[list[int]]) -> tuple[AttentionMetadata, list[int]]:
        """Metadata for sequences computing `lens[i]` tokens from position `starts[i]`, and their
        flat slots in that order. A sequence of up to `rows_max` tokens (the accepted drafts and
        the bonus token of a verify step) runs as that many one-token decode rows, each attending
        up to its own position (as the target's verify step runs drafts: the decode path, no
        per-chunk work); such sequences come first (the attention's decode rows lead)."""
        bs = self.block_size
        loc, seq_lens, slots, rows = [0], [], [], []
        for n, s, table in zip(lens, starts, tables):
            slots += [table[p // bs] * bs + p % bs for p in range(s, s + n)]
            for q in range(n) if n <= self.rows_max else (n - 1,):
                loc.append(loc[-1] + (1 if n <= self.rows_max else n))
                seq_lens.append(s + q + 1)
                rows.append(table)
        nd = 0
        while nd + 1 < len(loc) and loc[nd + 1] - loc[nd] == 1:
            nd += 1
        width = max(len(t) for t in rows)
        dev = self.device
        meta = AttentionMetadata(
            num_decodes=nd, query_start_loc=loc, seq_lens=seq_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in rows], dtype=torch.long, device=dev),
            decode_seq_lens=torch.tensor(seq_lens[:nd], dtype=torch.long, device=dev),
            state_slots=torch.zeros(len(rows), dtype=torch.long, device=dev))
        return meta, slots

    # -- what differs between MTP layers and EAGLE-3 heads ----------------------------------------
    def _target_states(self, target: TargetHidden) -> torch.Tensor:
        """The target's per-token states the drafter reads: its final hidden states."""
        return target.hidden

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
             step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the state a chained step is fed, what the head's logits are computed from)."""
        out = self.mtp(ids, positions, hidden, meta, self.kv_caches, step=step)
        return out, out

    def _logits(self, head_in: torch.Tensor, step: int) -> torch.Tensor:
        return self.mtp.compute_logits(head_in, step=step)

    def _pick(self, seq: Any, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if seq.params.greedy:
            return int(logits.argmax()), None
        q = (logits / seq.params.temperature).softmax(-1)
        return int(torch.multinomial(q, 1, generator=seq.generator or self.generator)), q

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest], target: TargetHidden | None) -> list[Draft]:
        drafts = [Draft() for _ in requests]
        if target is None:
            return drafts
        want = {r.seq.seq_id: i for i, r in enumerate(requests)}
        # -- 1. ingest every sequence's kept rows; one-token sequences first --------------------------
        items = []  # (seq, first row, count, start position)
        for seq_id, (first, count) in target.rows.items():
            seq = target.seqs.get(seq_id)
            if seq is None or count <= 0:
                continue
            start = target.positions[seq_id]
            count = min(count, len(seq.token_ids) - 1 - start)  # the token after each row must be known
            if count <= 0 or len(seq.blocks.table) * self.block_size < start + count:
                continue  # finished and freed, or nothing to do
            items.append((seq, first, count, start))
        if not items:
            return drafts
        items.sort(key=lambda it: it[2] > self.rows_max)  # (decode rows first: _meta)
        dev = self.device
        ids = torch.tensor([t for seq, _, c, s in items for t in seq.token_ids[s + 1: s + 1 + c]], dtype=torch.long,
                           device=dev)
        positions = torch.tensor([p for _, _, c, s in items for p in range(s, s + c)], dtype=torch.long, device=dev)
        rows = torch.tensor([r for _, f, c, _ in items for r in range(f, f + c)], dtype=torch.long, device=dev)
        meta, _ = self._meta([c for _, _, c, _ in items], [s for *_, s in items],
                             [seq.blocks.table for seq, *_ in items])
        out, head_in = self._run(ids, positions, self._target_states(target).index_select(0, rows), meta, 0)
        self.totals["ingested_tokens"] += len(ids)
        ends, end = [], 0  # each item's last row
        for _, _, c, _ in items:
            end += c
            ends.append(end - 1)
        live = [(j, want[seq.seq_id]) for j, (seq, _, c, s) in enumerate(items)
                if seq.seq_id in want and s + c == len(seq.token_ids) - 1]
        if not live:
            return drafts
        last = torch.tensor([ends[j] for j, _ in live], dtype=torch.long, device=dev)
        hidden = out.index_select(0, last)  # [n, H]: what a chained step is fed
        logits = self._logits(head_in.index_select(0, last), 0)
        probs: dict[int, list[torch.Tensor]] = {}
        for row, (_, i) in enumerate(live):
            tok, q = self._pick(requests[i].seq, logits[row])
            drafts[i].tokens.append(tok)
            if q is not None:
                probs.setdefault(i, []).append(q)
        # -- 2. chained drafts: one-token steps at the following positions ---------------------------
        bs = self.block_size
        scratch = {i: [self.pool_blocks + n * self.scratch_per_seq + b for b in range(self.scratch_per_seq)]
                   for n, (_, i) in enumerate(live)}
        for step in range(1, self.k):
            keep = [row for row, (_, i) in enumerate(live) if requests[i].max_drafts > step]
            if not keep:
                break
            tables, starts = [], []
            for row in keep:
                i = live[row][1]
                seq = requests[i].seq
                pos = len(seq.token_ids) - 2 + step  # the position of the draft fed in
                table = list(seq.blocks.table)
                need = pos // bs + 1
                table += scratch[i][: max(0, need - len(table))]
                tables.append(table)
                starts.append(pos)
            meta, _ = self._meta([1] * len(keep), starts, tables)
            sel = torch.tensor(keep, dtype=torch.long, device=dev)
            ids = torch.tensor([drafts[live[row][1]].tokens[-1] for row in keep], dtype=torch.long, device=dev)
            pos_t = torch.tensor(starts, dtype=torch.long, device=dev)
            hidden, head_in = self._run(ids, pos_t, hidden.index_select(0, sel), meta, step)
            logits = self._logits(head_in, step)
            live = [live[row] for row in keep]
            for row, (_, i) in enumerate(live):
                tok, q = self._pick(requests[i].seq, logits[row])
                drafts[i].tokens.append(tok)
                if q is not None:
                    probs.setdefault(i, []).append(q)
        for i, qs in probs.items():
            drafts[i].probs = torch.stack(qs)
        return drafts


class Eagle3Proposer(MTPProposer):
    """`eagle3`: an EAGLE-3 head (models/eagle3.py) from `--speculative-config` `model`, fed the
    target's aux hidden states (three layers' inputs, concatenated: `MoEForCausalLM.aux_hidden_layers`),
    its KV on the target's block tables like the MTP layer's; the same ingest and chaining."""

    method = "eagle3"

    def __init__(self, config: SpeculativeConfig, target: Any, *, num_blocks: int, block_size: int,
                 max_num_seqs: int, **_: Any):
        from models.eagle3 import load_eagle3

        cfg = target.config
        dev, dtype = target.embed.weight.device, target.embed.weight.dtype
        self.head = load_eagle3(str(config.model), cfg.num_layers, cfg.hidden_size, cfg.vocab_size, dtype, dev)
        # the residual stream entering these layers (vLLM's convention): the engine has the model
        # keep them (ModelRunner.keep_aux_hidden -> MoEForCausalLM.aux_hidden_layers)
        self.aux_hidden_layers = tuple(sorted(self.head.config.aux_layers(cfg.num_layers)))
        self.target, self.k, self.block_size = target, config.num_speculative_tokens, block_size
        self.pool_blocks = num_blocks
        self.scratch_per_seq = scratch_blocks(self.k, block_size)
        self.rows_max = 1  # its attention loops over sequences: verified runs stay one sequence each
        self.head_cache = self.head.allocate_kv_cache(num_blocks + max_num_seqs * self.scratch_per_seq, block_size)
        self.device = dev
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(0)
        self.totals = {"ingested_tokens": 0}

    def _target_states(self, target: TargetHidden) -> torch.Tensor:
        if len(target.aux) != 3:
            raise RuntimeError("EAGLE-3 drafts need the target's three aux hidden states")
        return torch.cat(target.aux, dim=-1)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
             step: int) -> tuple[torch.Tensor, torch.Tensor]:
        normed, pre = self.head(ids, positions, hidden, meta, self.head_cache, self.target.embed)
        return pre, normed

    def _logits(self, head_in: torch.Tensor, step: int) -> torch.Tensor:
        return self.head.compute_logits(head_in)
