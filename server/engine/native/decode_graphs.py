"""Decode steps replayed from CUDA graphs, one per batch-size bucket (nano-vllm's scheme).

At startup the runner captures the model's forward for decode-only batches of 1, 2, 4, ...
sequences (up to max_num_seqs, at most 256) on the static step buffers (`StepBuffers.dev`);
a decode step with B sequences then fills the buffers, pads to the next bucket (padding rows
write a scratch KV block and attend to nothing) and replays that graph: one launch instead
of hundreds. The routing capture inside the graph records static tensors, so the experts
chosen are read after a replay at no extra cost. With `cuda_graphs=False` (CPU tests) the
same padded path runs eagerly, which checks the padding logic anywhere.

Each bucket's step is a `models.placement.piecewise.Pieces`: one graph when nothing in the
step reaches the host, and when the placement executor computes experts on the host (the CPU
expert tier, CPU devices of a GPU model) or on another GPU, graphs cut at those calls, the
calls run eagerly between replays (that module's docstring explains the cut points and how
the host's work overlaps the device's). Buckets stop below the smallest host tier's copy-in
threshold (`PlacedExperts.sync_free_tokens`): larger steps read expert counts back.
"""

from __future__ import annotations

import logging
import time

import torch

from models.layers.paged import AttentionMetadata
from models.layers.moe import RoutingCapture
from models.model import MoEForCausalLM
from models.placement.piecewise import Pieces

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
        self.all_sizes, self.pad_slot, self.cuda_graphs = sorted(sizes), pad_slot, cuda_graphs
        self.sizes = list(self.all_sizes)  # the buckets made (capture: those the placement allows)
        self.graphs: dict[int, tuple[Pieces, torch.Tensor, RoutingCapture]] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

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

    def _limit(self) -> int:
        executor = next((blk.executor for blk in self.model.moe_blocks() if blk.executor is not None), None)
        limit = getattr(executor, "sync_free_tokens", None)
        return limit() if limit is not None else max(self.all_sizes)

    @property
    def num_pieces(self) -> dict[int, int]:
        """Graphs (pieces) per bucket: 1 where no step reaches the host."""
        return {b: p.num_pieces for b, (p, _, _) in self.graphs.items()}

    @torch.inference_mode()
    def capture(self) -> None:
        """Record (and with CUDA graphs capture) every bucket, largest first (they share one memory
        pool). Without CUDA graphs only the pieces' calls are recorded (run by `run`)."""
        t0 = time.monotonic()
        limit = self._limit()
        self.sizes = [b for b in self.all_sizes if b <= limit]
        if self.sizes != self.all_sizes:
            log.info("decode graphs up to %d sequences: larger steps reach the expert copy-in threshold", limit)
        d = self.dev
        self.graphs = {}
        pool = None  # one graph memory pool for every bucket
        storage: dict[str, torch.Tensor] = {}  # one set of the calls' static buffers (models.placement.piecewise)
        stream = torch.cuda.Stream() if self.cuda_graphs else None
        for b in reversed(self.sizes):
            d["ids"][:b].zero_()
            d["positions"][:b].zero_()
            d["slots"][:b].fill_(self.pad_slot)
            d["seq_lens"][:b].zero_()
            pieces = Pieces(self.cuda_graphs, pool, storage)
            # warm-up (kernel compilation, allocator) and the calls' static buffers
            pieces.record(lambda: self._forward(b, RoutingCapture()))  # noqa: B023
            capture = RoutingCapture(with_weights=True)  # static tensors: reading weights costs nothing
            hidden = None
            if self.cuda_graphs:
                torch.cuda.synchronize()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    hidden = pieces.capture(lambda: self._forward(b, capture))  # noqa: B023  [b, hidden] static
                torch.cuda.current_stream().wait_stream(stream)
                pool = pieces.pool
            self.graphs[b] = (pieces, hidden, capture)
        if self.cuda_graphs:
            torch.cuda.synchronize()
            log.info("captured CUDA graphs for decode batches %s in %.1fs (pieces per step: %s)", self.sizes,
                     time.monotonic() - t0, sorted(set(self.num_pieces.values())))

    def run(self, b: int, with_weights: bool = False) -> tuple[torch.Tensor, RoutingCapture]:
        """Hidden states [b, hidden] of the padded bucket `b` (inputs already in the buffers)."""
        pieces, hidden, capture = self.graphs[b]
        if self.cuda_graphs:
            pieces.replay()
            return hidden, capture
        capture = RoutingCapture(with_weights)
        return pieces.run_eager(lambda: self._forward(b, capture)), capture
