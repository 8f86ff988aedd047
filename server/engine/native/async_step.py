"""Async scheduling (vLLM v1's `--async-scheduling`): the host works one step ahead of the device.

Without it a step is schedule -> prepare -> forward + sample -> apply the results (append the
tokens, detokenize, check stops, stream), and the device waits while the host does the first two
and the last. With it, `AsyncStepper.step()` does, on the engine thread:

1. schedule step N+1 while step N is still computing: a sequence of step N that samples and goes
   on decoding counts one more token it does not know yet (`Sequence.num_pending`), and the
   tokens of step N count as in flight (`Sequence.num_inflight`), so the scheduler gives it its
   next position and KV slot;
2. prepare step N+1's buffers and hand it to the device thread (`engine-device`), which runs the
   steps in order: the input id of a pending token is copied there, on the device, from step N's
   tensor of sampled ids (no round trip through the host);
3. wait for step N's results and apply them (the scheduler, the output processor) while the
   device computes step N+1.

So the host learns a token one step later, and stop conditions are found one step late: the
token step N+1 computed for a sequence that stopped at step N is discarded (never emitted;
`Scheduler.update_from_output` skips finished sequences) and its KV blocks were freed when it
stopped. A sequence that certainly stops with its token (max_tokens, max_model_len) is not
scheduled ahead at all. Aborts, preemption (a preempted sequence's in-flight tokens are
recomputed) and prefix caching (blocks are committed when their tokens are known) follow from
the same two counters.

Synchronous boundaries, chosen per step: a step with a sampling sequence whose next step needs
its token on the host is applied as soon as it is launched, before anything else is scheduled:
structured outputs (the grammar mask of the next token needs the matcher advanced by this one),
repetition / frequency / presence penalties (they count the output tokens), `min_tokens` still
pending, and the prompt step of an n > 1 request (its completions are forked from the sampled
tokens). The whole step goes synchronous rather than those sequences alone, so every sequence's
results arrive in order and the others simply lose the overlap for that step. Grammar masks of a
step launched while another is in flight are filled on the host before the launch.

The device thread: on the CPU the forward runs there (PyTorch releases the GIL in its kernels),
so the host's Python work overlaps it; on CUDA it launches the kernels and waits for the step's
sampled ids, so the host never blocks on the GPU except to collect the step before last.

Off with expert placement (a rebalance moves experts between steps, which needs the device
idle) and, for now, with speculative decoding: `EngineConfig.async_scheduling` is resolved once
in `server.engine.factory.resolve_async_scheduling`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from models.layers.moe import RoutingCapture
from models.layers.paged import AttentionMetadata
from server.engine.expert_counts import expert_counts
from server.engine.native.logprobs import compute_logprobs
from server.engine.native.outputs import ModelOutput, SchedulerOutput
from server.engine.native.sampler import SamplingRow
from server.engine.native.step_result import StepError, StepResult
from server.engine.stats import IterationStats

if TYPE_CHECKING:
    from server.engine.native.sequence import Sequence
    from server.engine.native.step_inputs import StepInputs

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0005  # seconds: sys.setswitchinterval while async scheduling is on


def needs_host_token(seq: Sequence) -> bool:
    """Whether the step after one where `seq` samples needs that token on the host first."""
    p = seq.params
    return (seq.needs_fork or seq.grammar is not None or p.repetition_penalty != 1.0
            or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or p.min_tokens > seq.num_output)


def stops_surely(seq: Sequence, max_model_len: int) -> bool:
    """Whether the token being sampled is certainly its last (so nothing is scheduled after it)."""
    return seq.num_output + 1 >= seq.state.max_tokens or len(seq.token_ids) + 1 >= max_model_len


@dataclass
class InFlightStep:
    batch: SchedulerOutput
    inputs: StepInputs
    future: Future | None = None
    taken = None  # threading.Event: the device thread copied the host buffers (set in __post_init__)
    rows_of: dict[int, int] = field(default_factory=dict)  # seq_id -> its row in `tokens`
    tokens: torch.Tensor | None = None  # [rows] the sampled ids on the device (set by the device thread)
    synchronous: bool = False  # applied right after its launch

    def __post_init__(self) -> None:
        self.taken = threading.Event()


@dataclass
class AsyncStats:
    """Cumulative times (seconds) and counts, for benchmarks: `device` is the device thread's
    busy time, `wait` the time the engine thread waited for it."""

    steps: int = 0
    synchronous_steps: int = 0
    device: float = 0.0
    wait: float = 0.0
    wall: float = 0.0


class AsyncStepper:
    def __init__(self, core: Any):  # an EngineCore (core.py imports this module)
        self.core = core
        runner = core.runner
        runner.buffers.split_device()  # the host fills step N+1's buffers while step N reads its own
        if runner.graphs is not None:
            runner.graphs.dev = runner.buffers.dev
        self._device = ThreadPoolExecutor(1, thread_name_prefix="engine-device")
        # the device thread takes the GIL back after each kernel while the engine thread runs
        # Python: with the default 5 ms switch interval it waits that long each time
        # (docs/benchmarks.md, "Async scheduling"); process-wide, which the server can afford
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._inflight: InFlightStep | None = None
        self.stats = AsyncStats()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> StepResult:
        core = self.core
        t0 = time.monotonic()
        prev, self._inflight = self._inflight, None
        try:
            batch = core.scheduler.schedule()
        except Exception as exc:
            self._settle(prev)
            raise StepError(list(core.requests), exc) from exc
        stats = IterationStats(timestamp=t0, num_preemptions=batch.num_preemptions)
        finished_stats, core.output.pending_finished = core.output.pending_finished, []
        outputs: list = []
        routing = None
        step: InFlightStep | None = None
        try:
            if not batch.empty:
                core.output.on_scheduled(batch, t0)
                if core.fault_hook is not None:
                    core.fault_hook(batch.scheduled)
                step = self._launch(batch, prev)
            for done in (prev, step if step is not None and step.synchronous else None):
                if done is None:
                    continue
                result = self._wait(done)
                r = core.apply_output(done.batch, result, time.monotonic(), stats, finished_stats, outputs)
                routing = r if r is not None else routing
        except Exception as exc:
            # the requests of the step that failed and of the one in flight (its results are lost)
            ids = [it.seq.state.request_id for b in (prev.batch if prev is not None else None, batch)
                   if b is not None for it in b.scheduled]
            self._settle(prev)
            self._settle(step)
            raise StepError(list(dict.fromkeys(ids)), exc) from exc
        if step is not None and not step.synchronous:
            self._inflight = step
        self.stats.steps += 1
        self.stats.synchronous_steps += int(step is not None and step.synchronous)
        core.end_step(batch, stats, t0)
        self.stats.wall += stats.step_time
        return StepResult(outputs, stats, finished_stats, routing)

    def wait_device(self) -> None:
        """Block until the step in flight is computed (benchmarks: the device idle before timing
        something else); its results are applied by the next `step()`, an error raised there."""
        if self._inflight is not None and self._inflight.future is not None:
            self._inflight.future.exception()

    def _wait(self, step: InFlightStep) -> ModelOutput:
        t = time.monotonic()
        try:
            return step.future.result()
        finally:
            self.stats.wait += time.monotonic() - t

    @staticmethod
    def _settle(step: InFlightStep | None) -> None:
        """Wait for a step whose results are dropped (a failure): the device is idle after it."""
        if step is not None and step.future is not None:
            try:
                step.future.result()
            except Exception:  # noqa: BLE001 - the step's requests fail with the first error
                log.debug("dropped step failed too", exc_info=True)

    def close(self) -> None:
        self._settle(self._inflight)
        self._inflight = None
        self._device.shutdown(wait=True)

    # -- launching a step (engine thread) ---------------------------------------------------
    def _launch(self, batch: SchedulerOutput, prev: InFlightStep | None) -> InFlightStep:
        core = self.core
        runner = core.runner
        if prev is not None:
            prev.taken.wait()  # its inputs left the host buffers (on CUDA `prepare` waits for the copy)
        bucket = runner._graph_bucket(batch)
        bufs = runner.buffers
        dev_before = bufs.dev
        inp = bufs.prepare(batch, runner.block_size, runner.pad_slot, pad_to=bucket or 0,
                           pad_state_slot=runner.pad_state_slot, copy=False)
        if bufs.dev is not dev_before and runner.graphs is not None:
            log.warning("step buffers grew past the captured sizes; CUDA graphs are off from now on")
            runner.graphs, bucket = None, None
        step = InFlightStep(batch, inp)
        # the pending input ids: rows of the previous step's sampled ids
        src, dst = [], []
        for row, j in inp.pending:
            seq = batch.scheduled[j].seq
            if prev is None or seq.seq_id not in prev.rows_of:
                raise RuntimeError(f"sequence {seq.seq_id} has a pending token but no step in flight sampled it")
            src.append(prev.rows_of[seq.seq_id])
            dst.append(row)
        # sampling rows, grammar masks and prompt-logprob targets: read from the sequences now,
        # while the engine thread is the only one that changes them
        rows: list[SamplingRow] = []
        grammars, logit_index, owners = [], [], []
        synchronous = False
        for j, item in enumerate(batch.scheduled):
            if not item.samples:
                continue
            seq = item.seq
            synchronous |= needs_host_token(seq)
            fan = seq.params.n if seq.needs_fork else 1
            for i in range(fan):
                gen = seq.generator if fan == 1 else (seq.state.generators[i] if seq.state.generators else None)
                cache = seq.sampling_cache if i == 0 else {}
                output_ids = list(seq.output_ids) if needs_host_token(seq) else seq.output_ids
                rows.append(SamplingRow(seq.params, gen, seq.request.prompt_token_ids, output_ids,
                                        runner.eos_token_ids, cache))
                grammars.append(seq.grammar)
                logit_index.append(inp.sample_rows[j])
                owners.append(j)
            if fan == 1 and not stops_surely(seq, core.max_model_len):
                step.rows_of[seq.seq_id] = len(rows) - 1
        mask = runner.structured.mask(grammars) if any(g is not None for g in grammars) else None
        targets = {}
        for j, (first, count) in inp.prompt_rows.items():
            seq = batch.scheduled[j].seq
            start = seq.num_computed + seq.num_inflight
            targets[j] = (first, count, torch.tensor(seq.token_ids[start + 1: start + 1 + count]),
                          seq.params.prompt_logprobs)
        with_weights = any(item.seq.request.return_routing for item in batch.scheduled)
        step.synchronous = synchronous
        step.future = self._device.submit(self._device_step, step, prev, bucket, with_weights, src, dst,
                                          rows, logit_index, owners, mask, targets,
                                          list(batch.block_copies), list(batch.state_copies))
        # the scheduler's view from now on: these tokens are in flight, the sampled ones pending
        for item in batch.scheduled:
            item.seq.num_inflight += item.num_new
        if not synchronous:
            for item in batch.scheduled:
                if item.seq.seq_id in step.rows_of:
                    item.seq.num_pending = 1
        return step

    # -- the device thread --------------------------------------------------------------------
    @torch.inference_mode()
    def _device_step(self, step: InFlightStep, prev: InFlightStep | None, bucket: int | None, with_weights: bool,
                     src: list[int], dst: list[int], rows: list[SamplingRow], logit_index: list[int],
                     owners: list[int], mask, targets: dict, block_copies: list, state_copies: list) -> ModelOutput:
        t_start = time.monotonic()
        runner = self.core.runner
        bufs, inp = runner.buffers, step.inputs
        try:
            if runner.device.type == "cuda":  # the current device is per thread
                torch.cuda.set_device(runner.device)
            bufs.copy(inp.copy_sizes)
        finally:
            step.taken.set()
        d = bufs.dev
        if dst:
            if prev is None or prev.tokens is None:
                raise RuntimeError("the step before did not leave its sampled ids on the device")
            device = d["ids"].device
            d["ids"][torch.tensor(dst, device=device)] = prev.tokens[torch.tensor(src, device=prev.tokens.device)]
        runner._copy_rows(runner._kv_pairs, block_copies)
        runner._copy_rows(runner._state_pairs, state_copies)
        T = inp.num_tokens
        if bucket is not None:
            hidden, capture = runner.graphs.run(bucket, with_weights)
        else:
            meta = AttentionMetadata(
                num_decodes=inp.num_decodes, query_start_loc=inp.query_start_loc, seq_lens=inp.seq_lens,
                slot_mapping=d["slots"][:T], block_tables=d["tables"][: inp.num_seqs, : inp.width],
                decode_seq_lens=d["seq_lens"][: inp.num_decodes], state_slots=d["state_slots"][: inp.num_seqs])
            capture = RoutingCapture(with_weights)
            hidden = runner.model(d["ids"][:T], d["positions"][:T], meta, runner.kv_caches, capture)  # [T, hidden]
        logits = runner.model.compute_logits(hidden.index_select(0, d["logit_rows"][: inp.num_logit_rows]))
        out = ModelOutput(None, inp.query_start_loc, graph_bucket=bucket)
        if capture.expert_ids:
            # copied off the (static, with CUDA graphs) capture: the host reads them during the next step
            routing = capture.stacked_ids()[:T]  # [T, moe_layers, k]
            out.seq_expert_counts = expert_counts(routing, runner.num_experts, d["seg"][:T], inp.num_seqs).cpu()
            out.routing = routing.cpu()
            if runner.zero_experts:
                out.zero_expert = out.routing >= runner.num_experts
            if with_weights:
                out.routing_weights = capture.stacked_weights()[:T].cpu()
            dropped = capture.stacked_dropped()
            out.dropped = dropped[:T].cpu() if dropped is not None else None
        for j, (first, count, tgt, k) in targets.items():
            out.prompt_logprobs[j] = compute_logprobs(logits[first: first + count], tgt, k)
        if rows:
            picked = logits[torch.tensor(logit_index, device=logits.device)]  # [rows, vocab]
            sampled = runner.sampler(picked, rows, mask)
            step.tokens = sampled.tokens
            for j, token, lp in zip(owners, sampled.token_ids, sampled.logprobs):
                out.sampled_token_ids.setdefault(j, []).append(token)
                out.sampled_logprobs.setdefault(j, []).append(lp)
        self.stats.device += time.monotonic() - t_start
        return out
