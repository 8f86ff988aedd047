"""The model runner: turns a scheduled batch into tensors, runs the model, returns logits.

It owns the KV-cache tensors (one (k, v) pair per layer, `[num_blocks, block_size,
kv_heads, head_dim]`), performs the copy-on-write block copies the scheduler asks for, and
computes logits only where needed: the last token of every sequence that samples, plus
every prompt position of sequences that asked for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.layers.attention import AttentionMetadata
from models.layers.moe import RoutingCapture
from models.model import MoEForCausalLM
from server.engine.native.scheduler import SchedulerOutput


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [num_logit_rows, vocab] float32
    sample_rows: dict[int, int]  # position in `scheduled` -> logits row of its last token
    prompt_rows: dict[int, tuple[int, int]]  # position in `scheduled` -> (first row, count)
    routing: torch.Tensor | None  # [num_tokens, num_moe_layers, top_k] expert ids
    token_offsets: list[int]  # [num_scheduled + 1] start of each sequence's tokens
    # [num_tokens, num_moe_layers, top_k]: router weights (only when a request returns routing)
    # and assignments dropped over expert capacity (only with --expert-capacity-factor)
    routing_weights: torch.Tensor | None = None
    dropped: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        self.device = model.embed.weight.device
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> ModelOutput:
        self._copy_blocks(batch.block_copies)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logit_positions: list[int] = []
        sample_rows: dict[int, int] = {}
        prompt_rows: dict[int, tuple[int, int]] = {}
        for j, item in enumerate(batch.scheduled):
            seq = item.seq
            start, end = seq.num_computed, seq.num_computed + item.num_new
            ids.extend(seq.token_ids[start:end])
            pos = range(start, end)
            positions.extend(pos)
            table = seq.blocks.table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            loc.append(loc[-1] + item.num_new)
            seq_lens.append(end)
            tables.append(table)
            want_prompt = seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens
            if want_prompt:
                # logits at positions start..min(end, prompt)-1 predict prompt tokens start+1..
                last = min(end, seq.num_prompt_tokens)
                n = last - start - (1 if last == seq.num_prompt_tokens else 0)
                if n > 0:
                    prompt_rows[j] = (len(logit_positions), n)
                    logit_positions.extend(range(loc[j], loc[j] + n))
            if item.samples:
                sample_rows[j] = len(logit_positions)
                logit_positions.append(loc[j + 1] - 1)

        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        width = max(len(tb) for tb in tables)
        block_tables = torch.zeros(len(tables), width, dtype=torch.long)
        for r, tb in enumerate(tables):
            block_tables[r, : len(tb)] = torch.tensor(tb, dtype=torch.long)
        num_decodes = sum(1 for item in batch.scheduled if item.num_new == 1)
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=loc,
            seq_lens=seq_lens,
            slot_mapping=t(slots),
            block_tables=block_tables.to(self.device),
            decode_seq_lens=t(seq_lens[:num_decodes]),
        )
        capture = RoutingCapture(with_weights=any(item.seq.request.return_routing for item in batch.scheduled))
        hidden = self.model(t(ids), t(positions), meta, self.kv_caches, capture)  # [T, hidden]
        logits = self.model.compute_logits(hidden[t(logit_positions)])  # [rows, vocab]
        if not capture.expert_ids:
            return ModelOutput(logits, sample_rows, prompt_rows, None, loc)
        return ModelOutput(logits, sample_rows, prompt_rows, capture.stacked_ids(), loc,
                           capture.stacked_weights(), capture.stacked_dropped())
