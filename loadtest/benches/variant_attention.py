"""CPU decode step of a gpt-oss-shaped model (alternating sliding-window and full layers, sinks):
its attention by the C decode kernel against the PyTorch reference path, interleaved step by
step in one process (the plan switched with `model.plan_kernels` before each step).

    python -m loadtest.benches.variant_attention [--batch 1,16] [--prompt-len 512] [--rounds 12] [--threads N]

The model: random weights, float32, the 140M Mixtral-shaped benchmark model's sizes (hidden 512,
8 layers, 8 heads of 64, 4 KV heads, 8 experts of 1024, top-2, vocab 32000) with gpt-oss's
attention: sliding window 128 on every other layer, a learned sink per head. Each batch size
prefills `--batch` requests of `--prompt-len` random tokens, then times decode steps. Printed:
each variant's median and best wall time and median process-CPU time per step (steadier on a
shared machine), and the ratios reference / kernel.
"""

from __future__ import annotations

import argparse
import random
import tempfile

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=128,
             max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def checkpoint(path: str) -> str:
    import torch
    import transformers

    from loadtest.checkpoints import save_tokenizer

    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_()  # gpt-oss's sinks are learned; zeros would be a special case
    model.save_pretrained(path)
    save_tokenizer(path, SHAPE["vocab_size"], num_texts=50)
    return path


def measure(path: str, batch: int, prompt_len: int, rounds: int) -> dict:
    import torch

    from loadtest.harness import interleave
    from models.kernels.flags import KernelFlags
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    steps = 2 * (rounds + 2) + 4
    llm = LLM(path, dtype="float32", max_num_seqs=batch, max_num_batched_tokens=max(2048, prompt_len),
              max_model_len=prompt_len + steps + 8)
    core = llm.core
    rng = random.Random(0)
    for i in range(batch):
        core.add_request(EngineRequest(f"r{i}", [rng.randrange(3, 30000) for _ in range(prompt_len)],
                                       SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)))
    while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
        core.step()
    flags = {"kernel": KernelFlags(attention="auto"), "reference": KernelFlags(attention="reference")}
    kinds = {}

    def setup(name: str) -> None:
        plan = core.model.plan_kernels(flags[name])
        kinds[name] = sorted({f"{lk.attention_kind}: {lk.attention.value}" for lk in plan.layers})

    t = interleave({name: core.step for name in flags}, rounds=rounds, warmup=1, setup=setup)
    out = {name: s.summary() for name, s in t.items()}
    print(f"batch {batch}, context {prompt_len}, {torch.get_num_threads()} threads")
    for name, sm in out.items():
        print(f"  {name:9s} wall median {sm['wall_median_s'] * 1e3:7.2f} ms, best {sm['wall_best_s'] * 1e3:7.2f} ms; "
              f"CPU median {sm['cpu_median_s'] * 1e3:7.2f} ms ({', '.join(kinds[name])})")
    ref, ker = out["reference"], out["kernel"]
    print(f"  reference / kernel: wall median {ref['wall_median_s'] / ker['wall_median_s']:.2f}x, best "
          f"{ref['wall_best_s'] / ker['wall_best_s']:.2f}x; CPU median {ref['cpu_median_s'] / ker['cpu_median_s']:.2f}x")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.benches.variant_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,16", help="batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(tmp)
        for b in args.batch.split(","):
            measure(path, int(b), args.prompt_len, args.rounds)


if __name__ == "__main__":
    main()
