"""Offline API: `LLM(model).generate(prompts, sampling_params)`, like vLLM's."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from tqdm import tqdm

from server.config import EngineConfig
from server.engine.factory import build_native_core
from server.engine.request import CompletionOutput, EngineRequest, RequestOutput, SamplingParams


@dataclass
class GenerationResult:
    """One prompt's finished result: completions with their full text and token ids."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list | None = None


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs):
        if model is not None:
            engine_kwargs["model"] = model
        self.config = EngineConfig(**engine_kwargs)
        # offline: the engine loop runs on the compute thread, so no core is kept free
        self.core, self.model_info = build_native_core(self.config, reserve_cpu_cores=0)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, RequestOutput] = {}
        texts: dict[str, str | None] = {}
        for prompt, sp in zip(prompts, params_list):
            rid = f"offline-{next(self._ids)}"
            text = prompt if isinstance(prompt, str) else None
            ids: list[int] = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]
            self.core.add_request(EngineRequest(rid, ids, dataclasses.replace(sp), prompt=text))
            results[rid] = RequestOutput(rid, [
                CompletionOutput(index=i, logprobs=[] if sp.logprobs is not None else None) for i in range(sp.n)],
                prompt_token_ids=ids)
            texts[rid] = text
        with tqdm(total=len(results), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.core.has_unfinished():
                outputs, *_ = self.core.step()
                for out in outputs:
                    results[out.request_id].add(out)
                    bar.update(int(out.finished))
        return [GenerationResult(rid, texts[rid], acc.prompt_token_ids or [], acc.outputs, acc.prompt_logprobs)
                for rid, acc in results.items()]
