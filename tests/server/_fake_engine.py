"""A small in-process fake of `EngineClient` for pure API-layer tests (no model, no torch).

It follows the protocol's contract: deterministic tokens for a given seed, delta outputs, n
samples, stop strings, logprobs, max_queue_len (EngineOverloadedError), abort, and a KV-block
count that must return to zero. The acceptance tests run the real engine instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator

from server.config import BUNDLED_MODEL
from server.engine.admission import InFlight
from server.engine.protocol import ModelInfo, RequestTooLongError
from server.engine.request import CompletionOutput, EngineRequest, Logprob, RequestOutput
from server.engine.stats import IterationStats

WORDS = ["hello", " world", " the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog",
         ".", " and", " then", " a", " cat", " sat", "\n"]


def bundled_chat_template() -> str:
    """The bundled checkpoint's chat template (<|role|> ... <|end|>), read from its tokenizer config."""
    with open(Path(BUNDLED_MODEL) / "tokenizer_config.json") as f:
        return json.load(f)["chat_template"]


@lru_cache(maxsize=1)
def make_tokenizer() -> Any:
    """A byte-level BPE fast tokenizer with a chat template, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>",
                                                                  "<|system|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["".join(WORDS)] * 20 + ["hello there, how are you? fine thanks"] * 5, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    t.chat_template = bundled_chat_template()
    return t


class FakeEngine:
    def __init__(self, max_model_len: int = 256, max_num_seqs: int = 4, max_queue_len: int = 16,
                 num_kv_blocks: int = 256, block_size: int = 16, token_delay: float = 0.002) -> None:
        self.tokenizer = make_tokenizer()
        self.model_info = ModelInfo(name="fake-moe", path="/nonexistent/fake-moe", max_model_len=max_model_len,
                                    vocab_size=len(self.tokenizer), architecture="FakeForCausalLM",
                                    num_layers=2, num_experts=4, top_k=2, dtype="float32", device="cpu")
        self.max_num_seqs = max_num_seqs
        self.max_queue_len = max_queue_len
        self.block_size = block_size
        self._total_blocks = num_kv_blocks
        self._used_blocks = 0
        self.token_delay = token_delay
        self._aborted: set[str] = set()
        self.in_flight = InFlight(max_num_seqs, max_queue_len)  # the real admission rule
        self._running: asyncio.Semaphore | None = None
        self._loggers: list[Any] = []
        self._word_ids = [self.tokenizer.encode(w, add_special_tokens=False) for w in WORDS]
        self.started = False

    # -- protocol -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._running = asyncio.Semaphore(self.max_num_seqs)
        self.started = True

    async def shutdown(self) -> None:
        for rid in self.in_flight.ids():
            self._aborted.add(rid)

    async def check_health(self) -> None:
        return None

    def add_stat_logger(self, logger: Any) -> None:
        self._loggers.append(logger)

    def placement(self) -> None:
        return None

    def add_placement_listener(self, callback) -> None:
        pass

    def num_unfinished_requests(self) -> int:
        return len(self.in_flight)

    def kv_cache_usage(self) -> float:
        return self._used_blocks / self._total_blocks

    def num_free_kv_blocks(self) -> int:
        return self._total_blocks - self._used_blocks

    def num_total_kv_blocks(self) -> int:
        return self._total_blocks

    async def abort(self, request_id: str) -> None:
        if request_id in self.in_flight:
            self._aborted.add(request_id)

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        sp = request.sampling_params
        sp.verify_vocab(self.model_info.vocab_size)
        max_tokens = sp.max_tokens or (self.model_info.max_model_len - len(request.prompt_token_ids))
        if len(request.prompt_token_ids) + max_tokens > self.model_info.max_model_len:
            raise RequestTooLongError(f"prompt ({len(request.prompt_token_ids)}) + max_tokens ({max_tokens}) "
                                      f"> {self.model_info.max_model_len}")
        self.in_flight.admit(request.request_id)
        return self._run(request, max_tokens)

    # -- generation ---------------------------------------------------------------------------
    async def _run(self, request: EngineRequest, max_tokens: int) -> AsyncIterator[RequestOutput]:
        sp = request.sampling_params
        rid = request.request_id
        blocks = 0
        try:
            assert self._running is not None
            async with self._running:
                need = math.ceil((len(request.prompt_token_ids) + max_tokens) / self.block_size) * sp.n
                blocks = min(need, self._total_blocks - self._used_blocks)
                self._used_blocks += blocks
                if sp.greedy:  # deterministic per prompt, like argmax
                    seed = zlib.crc32(str(request.prompt_token_ids).encode())
                else:
                    seed = sp.seed if sp.seed is not None else random.randrange(2**31)
                rngs = [random.Random(seed * 1000 + i) for i in range(sp.n)]
                texts = [""] * sp.n
                counts = [0] * sp.n
                done: list[str | None] = [None] * sp.n
                first = True
                while not all(done):
                    await asyncio.sleep(self.token_delay)
                    if rid in self._aborted:
                        yield RequestOutput(rid, [CompletionOutput(i, finish_reason="abort") for i in range(sp.n)
                                                  if done[i] is None], finished=True)
                        return
                    outs = []
                    for i in range(sp.n):
                        if done[i]:
                            continue
                        rng = rngs[i]
                        word = self._word_ids[rng.randrange(len(WORDS))]
                        tid = word[0]
                        counts[i] += 1
                        piece = self.tokenizer.decode([tid])
                        texts[i] += piece
                        out = CompletionOutput(i, text=piece, token_ids=[tid])
                        if sp.logprobs is not None:
                            top = [(t, -0.5 - k) for k, t in enumerate([tid] + list(range(10, 40)))][: sp.logprobs]
                            out.logprobs = [Logprob(tid, -0.5, top)]
                        for s in sp.stop:
                            at = texts[i].find(s)
                            if at >= 0:
                                done[i] = "stop"
                                out.stop_reason = s
                                keep = at + (len(s) if sp.include_stop_str_in_output else 0)
                                out.text = piece[: max(0, len(piece) - (len(texts[i]) - keep))]
                                break
                        if counts[i] >= max_tokens and not done[i]:
                            done[i] = "length"
                        out.finish_reason = done[i]
                        if request.return_routing:
                            out.routing = [[[0, 1], [2, 3]]]
                        outs.append(out)
                    ro = RequestOutput(rid, outs, finished=all(done))
                    if first:
                        ro.prompt_token_ids = list(request.prompt_token_ids)
                        if sp.prompt_logprobs is not None:
                            ro.prompt_logprobs = [None] + [Logprob(t, -1.0, [(t, -1.0)])
                                                           for t in request.prompt_token_ids[1:]]
                        first = False
                    for lg in self._loggers:
                        lg.record(IterationStats(timestamp=time.monotonic(), num_running=len(self.in_flight),
                                                 kv_cache_usage=self.kv_cache_usage()), [], None)
                    yield ro
        finally:
            self._used_blocks -= blocks
            self.in_flight.release(rid)
            self._aborted.discard(rid)
            for lg in self._loggers:
                lg.record(IterationStats(timestamp=time.monotonic(), num_running=len(self.in_flight),
                                         kv_cache_usage=self.kv_cache_usage()), [], None)
