"""The model runner: turns a scheduled batch into tensors, runs the model, samples.

It owns the KV-cache tensors (one (k, v) pair per attention layer, `[num_blocks + 1,
block_size, kv_heads, head_dim]`; the extra block is scratch for padding rows) and, for hybrid
models, the state slots of the linear-attention layers (`num_state_slots + 1` rows, the last
scratch), performs the copy-on-write block copies and the forked states' copies the scheduler
asks for, and computes logits only where needed:
the last token of every sequence that samples, plus every prompt position of sequences that
asked for prompt logprobs. It returns the sampled token ids and their logprobs (the prompt
sequence of an n > 1 request samples n tokens, one per completion, from its last logits row)
and the prompt logprobs; structured outputs' grammar masks are filled while the model runs.

A step's metadata goes into preallocated buffers (`step_inputs.StepBuffers`), copied to the
device without blocking, and the forward reads nothing back to the host (with the sync-free
kernels). On CUDA, decode-only steps replay CUDA graphs captured at startup per batch-size
bucket (`decode_graphs.DecodeGraphs`) where the model's kernel plan says so
(`KernelPlan.cuda_graphs`); with the CPU expert tier each bucket is piecewise graphs cut at
the tier's calls (models/placement/piecewise.py); prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import logging

import torch

from models.layers.paged import AttentionMetadata
from models.layers.moe import RoutingCapture
from models.model import MoEForCausalLM
from server.engine.expert_counts import expert_counts
from server.engine.native.decode_graphs import DecodeGraphs, bucket_sizes
from server.engine.native.logprobs import compute_logprobs
from server.engine.native.outputs import ModelOutput, SchedulerOutput
from server.engine.native.sampler import Sampler, SamplingRow
from server.engine.native.spec.verify import VerifyItem, verify
from server.engine.native.step_inputs import StepBuffers
from server.engine.structured.runtime import StructuredRuntime

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, num_blocks: int, block_size: int, max_num_seqs: int = 64,
                 max_model_len: int = 2048, max_num_batched_tokens: int = 2048,
                 seed: int = 0, eos_token_ids: tuple[int, ...] = (), structured: StructuredRuntime | None = None,
                 num_state_slots: int = 0):
        self.model = model
        self.block_size = block_size
        self.device = model.embed.weight.device
        # + 1: a scratch block, and a scratch state row
        self.kv_caches = model.allocate_kv_cache(num_blocks + 1, block_size,
                                                 num_state_slots + 1 if model.config.hybrid else 0)
        kv_layers = set(model.kv_layers())
        self._kv_pairs = [c for i, c in enumerate(self.kv_caches) if i in kv_layers]
        self._state_pairs = [c for i, c in enumerate(self.kv_caches) if i not in kv_layers]
        self.pad_slot = num_blocks * block_size  # first slot of the scratch block
        self.pad_state_slot = num_state_slots
        self.sampler = Sampler(model.config.vocab_size, self.device, seed)
        self.eos_token_ids = tuple(eos_token_ids)
        self.structured = structured if structured is not None else StructuredRuntime(model.config.vocab_size)
        self._moe_blocks = model.moe_blocks()
        self.num_moe_layers, self.num_experts = len(self._moe_blocks), model.config.num_experts
        self.zero_experts = model.config.zero_experts  # router ids >= num_experts: zero-computation experts
        sizes = bucket_sizes(max_num_seqs)
        max_blocks = -(-max_model_len // block_size)
        self.buffers = StepBuffers(max(max_num_batched_tokens, max_num_seqs, sizes[-1]), max(max_num_seqs, sizes[-1]),
                                   max_blocks, self.device)
        self.graphs: DecodeGraphs | None = None
        self.keep_hidden = False  # a speculative proposer reads the step's hidden states (ModelOutput.hidden)
        self._graph_placement = None  # the placement the graphs were made under (_placement_key)
        if model.kernel_plan is None:
            raise ValueError("the model has no kernel plan (models.load_model applies one)")
        log.info("%s", model.kernel_plan.table())
        if model.kernel_plan.cuda_graphs:
            self.enable_decode_graphs(sizes, cuda_graphs=True)

    def keep_aux_hidden(self, layers: tuple[int, ...]) -> None:
        """Keep the residual stream entering these decoder layers each step (EAGLE-3's auxiliary
        hidden states, as vLLM takes them; ModelOutput.aux, in `layers` order): the model's own
        capture (`MoEForCausalLM.aux_hidden_layers`). Decode steps then run eagerly (a replayed
        CUDA graph would not refresh the captured list)."""
        if not layers:
            return
        if list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < len(self.model.layers):
            raise ValueError(f"aux_hidden_layers must be distinct, increasing decoder layer indices, not {layers}")
        self.model.aux_hidden_layers = tuple(layers)
        self.graphs = None

    def enable_decode_graphs(self, sizes: list[int], cuda_graphs: bool = True) -> None:
        """Run decode-only steps padded to `sizes` buckets: captured CUDA graphs, or eagerly
        on the same static buffers (`cuda_graphs=False`: tests the padding path on CPU)."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.buffers.dev, sizes, self.pad_slot, cuda_graphs)
        self.graphs.capture()
        self._graph_placement = self._placement_key()

    def _placement_key(self):
        """(executor, generation) of the experts' placement (models.placement), None without one:
        graphs captured under another key hold tensors of a placement that has moved."""
        executor = self._moe_blocks[0].executor if self._moe_blocks else None
        return None if executor is None else (id(executor), getattr(executor, "generation", 0))

    def _copy_rows(self, pairs: list, copies: list[tuple[int, int]]) -> None:
        """Rows (src, dst) of every tensor in `pairs`: KV blocks (copy-on-write) or state slots (forks)."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for pair in pairs:
            for t in pair:
                t[dst] = t[src]

    def _graph_bucket(self, batch: SchedulerOutput) -> int | None:
        if self.graphs is None or len(batch.scheduled) > self.graphs.max_size:
            return None
        if self._placement_key() != self._graph_placement:
            # experts placed or moved since capture (models.placement): the graphs ran on weights
            # and tables that have moved (and piecewise steps' host calls hold the CPU tier's
            # experts as they were); the placed decode step is sync-free, so they are made again,
            # unless the plan now says no graphs (experts on several GPUs)
            if self.graphs.cuda_graphs and not self.model.kernel_plan.cuda_graphs:
                log.info("experts placed after the decode graphs were made: decode runs eagerly from now on")
                self.graphs = None
                return None
            log.info("expert placement changed since the decode graphs were made: making them again")
            self.graphs.capture()
            self._graph_placement = self._placement_key()
        if any(it.num_new != 1 for it in batch.scheduled):
            return None
        return self.graphs.bucket(len(batch.scheduled))

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> ModelOutput:
        # grammar masks of this step's samplers are filled while the model runs
        # (sequences with drafts carry their positions' masks already: spec/engine.py)
        self.structured.begin_step([item.seq.grammar for item in batch.scheduled if item.samples and not item.num_spec])
        self._copy_rows(self._kv_pairs, batch.block_copies)
        self._copy_rows(self._state_pairs, batch.state_copies)
        bucket = self._graph_bucket(batch)
        bufs = self.buffers
        dev_before = bufs.dev
        inp = bufs.prepare(batch, self.block_size, self.pad_slot, pad_to=bucket or 0,
                           pad_state_slot=self.pad_state_slot)
        if bufs.dev is not dev_before and self.graphs is not None:  # buffers grew: graphs point at old ones
            log.warning("step buffers grew past the captured sizes; CUDA graphs are off from now on")
            self.graphs, bucket = None, None
        d = bufs.dev
        T = inp.num_tokens
        with_weights = any(item.seq.request.return_routing for item in batch.scheduled)
        if bucket is not None:
            hidden, capture = self.graphs.run(bucket, with_weights)
        else:
            if inp.attention is not None:  # drafts verified as one-token decode rows (step_inputs.py)
                nd, loc, lens, tables, decode_lens = inp.attention
                meta = AttentionMetadata(num_decodes=nd, query_start_loc=loc, seq_lens=lens,
                                         slot_mapping=d["slots"][:T], block_tables=tables, decode_seq_lens=decode_lens)
            else:
                meta = AttentionMetadata(
                    num_decodes=inp.num_decodes, query_start_loc=inp.query_start_loc, seq_lens=inp.seq_lens,
                    slot_mapping=d["slots"][:T], block_tables=d["tables"][: inp.num_seqs, : inp.width],
                    decode_seq_lens=d["seq_lens"][: inp.num_decodes], state_slots=d["state_slots"][: inp.num_seqs])
            capture = RoutingCapture(with_weights)
            hidden = self.model(d["ids"][:T], d["positions"][:T], meta, self.kv_caches, capture)  # [T, hidden]
        rows = d["logit_rows"][: inp.num_logit_rows]
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [rows, vocab]
        out = ModelOutput(None, inp.query_start_loc, graph_bucket=bucket)
        if capture.expert_ids:
            out.routing = capture.stacked_ids()[:T]  # [T, moe_layers, k]
            if self.zero_experts:  # counted as their own kind; expert_counts skips ids >= num_experts
                out.zero_expert = out.routing >= self.num_experts
            # [S, L, E] on the host: one scatter, one copy
            out.seq_expert_counts = expert_counts(out.routing, self.num_experts, d["seg"][:T], inp.num_seqs).cpu()
            if with_weights:
                out.routing_weights = capture.stacked_weights()[:T]
            dropped = capture.stacked_dropped()
            out.dropped = dropped[:T] if dropped is not None else None
        self._prompt_logprobs(batch, logits, inp.prompt_rows, out)
        self._sample(batch, logits, inp.sample_rows, out)
        self._verify(batch, logits, inp.sample_rows, out)
        if self.keep_hidden:
            out.hidden = hidden[:T]
            if self.model.aux_hidden_layers:
                out.aux = [a[:T] for a in self.model.aux_hidden]
        return out

    def _verify(self, batch: SchedulerOutput, logits: torch.Tensor, sample_rows: dict[int, int],
                out: ModelOutput) -> None:
        """Speculative decoding: accept or reject each drafted sequence's drafts (spec/verify.py)."""
        owners = [j for j, item in enumerate(batch.scheduled) if item.num_spec]
        if not owners:
            return
        items = [VerifyItem(batch.scheduled[j].seq, sample_rows[j], batch.scheduled[j].num_spec) for j in owners]
        for j, (tokens, lps, accepted) in zip(owners, verify(self.sampler, logits, items, self.eos_token_ids)):
            out.sampled_token_ids[j] = tokens
            out.sampled_logprobs[j] = lps
            out.num_accepted[j] = accepted

    def _prompt_logprobs(self, batch: SchedulerOutput, logits: torch.Tensor, prompt_rows: dict[int, tuple[int, int]],
                         out: ModelOutput) -> None:
        for j, (first, count) in prompt_rows.items():
            seq = batch.scheduled[j].seq
            start = seq.num_computed
            targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + count])  # [count]
            out.prompt_logprobs[j] = compute_logprobs(logits[first : first + count], targets,
                                                      seq.params.prompt_logprobs)

    def _sample(self, batch: SchedulerOutput, logits: torch.Tensor, sample_rows: dict[int, int],
                out: ModelOutput) -> None:
        """One row per completion: a forking prompt sequence samples its n completions' first
        tokens from its one logits row, each with that completion's generator."""
        rows: list[SamplingRow] = []
        grammars, logit_index, owners = [], [], []
        for j, item in enumerate(batch.scheduled):
            if not item.samples or item.num_spec:
                continue
            seq = item.seq
            fan = seq.params.n if seq.needs_fork else 1
            for i in range(fan):
                gen = seq.generator if fan == 1 else (seq.state.generators[i] if seq.state.generators else None)
                cache = seq.sampling_cache if i == 0 else {}
                rows.append(SamplingRow(seq.params, gen, seq.request.prompt_token_ids, seq.output_ids,
                                        self.eos_token_ids, cache))
                grammars.append(seq.grammar)  # a child's grammar starts as a copy of this one
                logit_index.append(sample_rows[j])
                owners.append(j)
        if not rows:
            return
        picked = logits[torch.tensor(logit_index, device=logits.device)]  # [rows, vocab]
        sampled = self.sampler(picked, rows, self.structured.mask(grammars))
        for j, token, lp in zip(owners, sampled.token_ids, sampled.logprobs):
            out.sampled_token_ids.setdefault(j, []).append(token)
            out.sampled_logprobs.setdefault(j, []).append(lp)

