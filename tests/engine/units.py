"""Builders for the engine's unit tests (no model): sequences, a KV-cache manager, a scheduler
and the steps the engine would take around them."""

from __future__ import annotations

from server.engine.native.kv_cache import BlockPool, KVCacheManager
from server.engine.native.outputs import ModelOutput, SchedulerOutput
from server.engine.native.scheduler import Scheduler
from server.engine.native.sequence import RequestState, Sequence
from server.engine.native.stop import check_stop
from server.engine.request import EngineRequest, SamplingParams

BS = 4
EOS = 2


def make_seq(seq_id: int, prompt: list[int], output: list[int] = (), *, arrival: float = 0.0, max_tokens: int = 8,
             **params) -> Sequence:
    req = EngineRequest(f"r{seq_id}", list(prompt), SamplingParams(max_tokens=max_tokens, **params),
                        arrival_time=arrival)
    n = req.sampling_params.n
    state = RequestState(req, max_tokens=max_tokens, num_seqs_left=n, generators=[None] * n)
    seq = Sequence(seq_id, 0, state, list(prompt) + list(output), len(prompt), output_ids=list(output),
                   needs_fork=n > 1)
    state.seqs = [seq]
    return seq


def manager(num_blocks: int, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, BS, caching))


def run_prefill(kv: KVCacheManager, seq: Sequence) -> None:
    """As the engine does after a step computed the whole prompt: commit the full blocks."""
    assert kv.allocate(seq.blocks, 0, len(seq.token_ids), [])
    seq.num_computed = len(seq.token_ids)
    kv.commit(seq.blocks, seq.token_ids, seq.num_computed)


def stop_of(seq: Sequence, token: int, **kw):
    """check_stop after appending `token`, as the scheduler does."""
    seq.token_ids.append(token)
    seq.output_ids.append(token)
    kw.setdefault("eos_token_ids", (EOS,))
    kw.setdefault("max_model_len", 64)
    return check_stop(seq, token, **kw)


def scheduler(num_blocks: int = 32) -> Scheduler:
    return Scheduler(KVCacheManager(BlockPool(num_blocks, BS)), max_num_seqs=8, max_num_batched_tokens=64,
                     max_model_len=64, eos_token_ids=(EOS,))


def model_output(batch: SchedulerOutput, sampled: dict[int, list[int]]) -> ModelOutput:
    out = ModelOutput(None, [0] * (len(batch.scheduled) + 1))
    out.sampled_token_ids = sampled
    out.sampled_logprobs = {j: [None] * len(t) for j, t in sampled.items()}
    return out


def prompts_of(lens, base=2):
    return [[(base + 7 * i + j) % 300 + 2 for j in range(n)] for i, n in enumerate(lens)]
