"""A minimal batch runner over the paged KV cache, without a scheduler.

For the tests: prefill a batch of prompts, then decode
greedily, with each sequence given its own contiguous run of blocks. The serving engine
(`server/engine/native`) does the real scheduling.
"""

from __future__ import annotations

import torch

from models.layers.paged import AttentionMetadata
from models.layers.moe import RoutingCapture
from models.model import MoEForCausalLM


class SimpleRunner:
    def __init__(self, model: MoEForCausalLM, max_len: int, batch: int, block_size: int = 16):
        self.model, self.block_size = model, block_size
        self.blocks_per_seq = (max_len + block_size - 1) // block_size
        # sequence i also owns state slot i (the linear-attention layers of hybrid models)
        self.caches = model.allocate_kv_cache(self.blocks_per_seq * batch, block_size, num_state_slots=batch)
        dev = model.embed.weight.device
        # sequence i owns blocks [i * blocks_per_seq, (i + 1) * blocks_per_seq)
        self.tables = torch.arange(batch * self.blocks_per_seq, device=dev).view(batch, self.blocks_per_seq)
        self.device = dev

    @torch.inference_mode()
    def step(
        self, seqs: list[int], new_tokens: list[list[int]], start: list[int], capture: RoutingCapture | None = None
    ) -> torch.Tensor:
        """Run `new_tokens[j]` of sequence `seqs[j]` at positions from `start[j]`; returns the
        hidden states of every new token, flattened [T, hidden] in the given order."""
        # single-token sequences go first (the attention's decode path); outputs come back in order
        order = sorted(range(len(seqs)), key=lambda j: len(new_tokens[j]) != 1)
        if order != list(range(len(seqs))):
            hidden = self.step([seqs[j] for j in order], [new_tokens[j] for j in order],
                               [start[j] for j in order], capture)
            pieces, s = {}, 0
            for j in order:
                pieces[j] = hidden[s : s + len(new_tokens[j])]
                s += len(new_tokens[j])
            if capture is not None:
                raise ValueError("routing capture needs single-token sequences first")
            return torch.cat([pieces[j] for j in range(len(seqs))])
        ids, pos, slots, loc, lens = [], [], [], [0], []
        for s, toks, st in zip(seqs, new_tokens, start):
            ids += toks
            p = list(range(st, st + len(toks)))
            pos += p
            slots += [int(self.tables[s, q // self.block_size]) * self.block_size + q % self.block_size for q in p]
            loc.append(loc[-1] + len(toks))
            lens.append(st + len(toks))
        nd = sum(1 for t in new_tokens if len(t) == 1)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            num_decodes=nd, query_start_loc=loc, seq_lens=lens, slot_mapping=t(slots),
            block_tables=self.tables[t(seqs)], decode_seq_lens=t(lens[:nd]), state_slots=t(seqs),
        )
        return self.model(t(ids), t(pos), meta, self.caches, capture)


@torch.inference_mode()
def prefill_logits(model: MoEForCausalLM, prompts: list[list[int]], capture: RoutingCapture | None = None):
    """Logits for every position of every prompt: list of [len_i, vocab]."""
    runner = SimpleRunner(model, max(len(p) for p in prompts), len(prompts))
    hidden = runner.step(list(range(len(prompts))), prompts, [0] * len(prompts), capture)
    logits = model.compute_logits(hidden)
    out, s = [], 0
    for p in prompts:
        out.append(logits[s : s + len(p)])
        s += len(p)
    return out


@torch.inference_mode()
def greedy_generate(model: MoEForCausalLM, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (batched prefill, then batched decode steps)."""
    longest = max(len(p) for p in prompts) + max_new_tokens
    runner = SimpleRunner(model, longest, len(prompts))
    idx = list(range(len(prompts)))
    hidden = runner.step(idx, prompts, [0] * len(prompts))
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    nxt = model.compute_logits(hidden[ends]).argmax(-1).tolist()
    out = [[t] for t in nxt]
    lens = [len(p) for p in prompts]
    for _ in range(max_new_tokens - 1):
        hidden = runner.step(idx, [[t] for t in nxt], lens)
        lens = [n + 1 for n in lens]
        nxt = model.compute_logits(hidden).argmax(-1).tolist()
        for o, t in zip(out, nxt):
            o.append(t)
    return out
