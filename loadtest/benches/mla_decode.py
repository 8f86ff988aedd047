"""Decode step of a DeepSeek-V3-shaped model (MLA) on the CPU: the MLA kernel against the PyTorch path.

    python -m loadtest mla-decode [--batches 1 16] [--rounds 8] [--steps 4] [--prompt 128]

A random-weight DeepSeek-V3 model (transformers' config, saved and served by the native engine,
float32 on the CPU) with the hidden size, layers and expert shapes of the 140M Mixtral-shaped
benchmark model (hidden 512, 8 layers, 8 experts of 1024 top-2; loadtest/checkpoints.py) plus
DeepSeek-V3's parts: MLA (8 heads, kv_lora_rank 256, q_lora_rank 256, nope 64, rope 32, v 64),
a shared expert, sigmoid routing with a correction bias. For each batch size one engine
prefills that many requests of `--prompt` random tokens, then its decode steps are timed with
the MLA layers on the C kernel ("cpu": absorbed form over the paged latents, in place) and on
their PyTorch path ("reference": gather the latents, SDPA), the plan switched before each sample
(`model.plan_kernels`), interleaved round by round (loadtest/harness.py) so that background
load hits both alike. Everything else (experts, linear layers) runs the default plan's kernels.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### MLA decode step (CPU)"
VARIANTS = ("reference", "cpu")


def build(path: Path, layers: int, hidden: int, max_len: int) -> None:
    import torch
    import transformers

    from loadtest.checkpoints import save_tokenizer

    cfg = transformers.DeepseekV3Config(
        vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        intermediate_size=2 * hidden, moe_intermediate_size=2 * hidden, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, max_position_embeddings=max_len, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    save_tokenizer(path, cfg.vocab_size)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest mla-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="concurrent sequences")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per sample")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, help="torch threads (default: the engine's)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from models.kernels.flags import KernelFlags
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    total_steps = (args.rounds + 1) * args.steps * len(VARIANTS) + 4
    max_len = args.prompt + total_steps + 16
    tmp = tempfile.TemporaryDirectory(prefix="mla-decode-")
    path = Path(tmp.name)
    build(path, args.layers, args.hidden, max_len)
    rows, points, plans, all_samples = [], [], {}, {}
    for batch in args.batches:
        llm = LLM(str(path), dtype="float32", max_num_seqs=batch, max_num_batched_tokens=2048, max_model_len=max_len)
        core = llm.core
        g = torch.Generator().manual_seed(batch)
        for i in range(batch):
            core.add_request(EngineRequest(f"r{i}", torch.randint(3, 30000, (args.prompt,), generator=g).tolist(),
                                           SamplingParams(temperature=0.0, max_tokens=total_steps, ignore_eos=True)))
        while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
            core.step()

        def setup(name: str, core=core) -> None:
            plans[name] = core.model.plan_kernels(KernelFlags(attention=name)).to_dict()

        def steps(core=core) -> None:
            for _ in range(args.steps):
                core.step()

        samples = interleave({name: steps for name in VARIANTS}, rounds=args.rounds, warmup=1, setup=setup)
        med = {name: samples[name].summary()["wall_median_s"] / args.steps * 1e3 for name in VARIANTS}
        best = {name: samples[name].summary()["wall_best_s"] / args.steps * 1e3 for name in VARIANTS}
        ratio = med["reference"] / med["cpu"]
        rows.append([batch, med["reference"], med["cpu"], f"{ratio:.2f}x", best["reference"], best["cpu"]])
        points.append({"batch": batch, "median_ms": med, "best_ms": best, "speedup": ratio})
        all_samples[str(batch)] = {k: v.to_json() for k, v in samples.items()}
        print(f"batch {batch}: reference {med['reference']:.2f} ms/step, cpu kernel {med['cpu']:.2f} ms/step "
              f"({ratio:.2f}x)", flush=True)
        del llm, core
    result = results.new_result("mla-decode", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING)
    result["measurements"] = {"kernel_plans": plans, "points": points, "samples": all_samples}
    result["summary"]["blocks"] = [
        results.text(f"A random-weight DeepSeek-V3-shaped model (hidden {args.hidden}, {args.layers} layers of MLA "
                     "with kv_lora_rank 256, 8 routed experts of 1024 top-2 and a shared expert), float32, "
                     f"{torch.get_num_threads()} thread(s), {args.prompt}-token prompts. Per batch size: median and "
                     f"best over {args.rounds} interleaved rounds of {args.steps} decode steps, the MLA layers on "
                     "their PyTorch path (reference) or the C kernel (cpu)."),
        results.table(None, [results.column("batch", "d"), results.column("reference (ms/step)", ".2f"),
                             results.column("cpu kernel (ms/step)", ".2f"), results.column("speedup"),
                             results.column("reference best", ".2f"), results.column("cpu best", ".2f")], rows),
        {"kind": "note"},
    ]
    output.finish(result, args)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
