"""Decode steps replayed from CUDA graphs, one per batch-size bucket (nano-vllm's scheme).

At startup the runner captures the model's forward for decode-only batches of 1, 2, 4, ...
sequences (up to max_num_seqs, at most 256) on the static step buffers (`StepBuffers.dev`);
a decode step with B sequences then fills the buffers, pads to the next bucket (padding rows
write a scratch KV block and attend to nothing) and replays that graph: one launch instead
of hundreds. The routing capture inside the graph records static tensors, so the experts
chosen are read after a replay at no extra cost. With `cuda_graphs=False` (CPU tests) the
same padded path runs eagerly, which checks the padding logic anywhere.
"""

from __future__ import annotations

import logging
import time

import torch

from models.layers.paged import AttentionMetadata
from models.layers.moe import RoutingCapture
from models.model import MoEForCausalLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Buckets up to the first one that holds max_num_seqs (capped at 256)."""
    sizes = [b for b in BUCKETS if b < max_num_seqs]
    bigger = [b for b in BUCKETS if b >= max_num_seqs]
    return sizes + bigger[:1]


class DecodeGraphs:
    def __init__(self, model: MoEForCausalLM, kv_caches, dev: dict[str, torch.Tensor], sizes: list[int],
                 pad_slot: int, cuda_graphs: bool):
        self.model, self.kv_caches, self.dev = model, kv_caches, dev
        self.sizes, self.pad_slot, self.cuda_graphs = sorted(sizes), pad_slot, cuda_graphs
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor, RoutingCapture]] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def _meta(self, b: int) -> AttentionMetadata:
        d = self.dev
        return AttentionMetadata(num_decodes=b, query_start_loc=list(range(b + 1)), seq_lens=[1] * b,
                                 slot_mapping=d["slots"][:b], block_tables=d["tables"][:b],
                                 decode_seq_lens=d["seq_lens"][:b])

    def _forward(self, b: int, capture: RoutingCapture) -> torch.Tensor:
        d = self.dev
        return self.model(d["ids"][:b], d["positions"][:b], self._meta(b), self.kv_caches, capture)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (they share one memory pool)."""
        if not self.cuda_graphs:
            return
        t0 = time.monotonic()
        d = self.dev
        pool = None
        for b in reversed(self.sizes):
            d["ids"][:b].zero_()
            d["positions"][:b].zero_()
            d["slots"][:b].fill_(self.pad_slot)
            d["seq_lens"][:b].zero_()
            self._forward(b, RoutingCapture())  # warm-up: kernel compilation, allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            capture = RoutingCapture(with_weights=True)  # static tensors: reading weights costs nothing
            with torch.cuda.graph(graph, pool):
                hidden = self._forward(b, capture)  # [b, hidden] static output
            pool = graph.pool()
            self.graphs[b] = (graph, hidden, capture)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batches %s in %.1fs", self.sizes, time.monotonic() - t0)

    def run(self, b: int, with_weights: bool = False) -> tuple[torch.Tensor, RoutingCapture]:
        """Hidden states [b, hidden] of the padded bucket `b` (inputs already in the buffers)."""
        if self.cuda_graphs:
            graph, hidden, capture = self.graphs[b]
            graph.replay()
            return hidden, capture
        capture = RoutingCapture(with_weights)
        return self._forward(b, capture), capture
