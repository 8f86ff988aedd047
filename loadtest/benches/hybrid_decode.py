"""Decode time per token of a hybrid (Qwen3-Next-shaped) model against context length, split by layer kind.

    python -m loadtest hybrid-decode [--contexts 512 2048 8192] [--steps 24] [--rounds 3]
        [--layers 8] [--hidden 512] [--plot docs/images/hybrid-decode.png]

A random-weight Qwen3-Next model (transformers' config, saved and served by the native engine,
float32 on the CPU): `--layers` layers, one full-attention layer in four (the published 3:1
pattern), the others Gated DeltaNet linear attention. For each context length one engine holds
one sequence prefilled to that length; the engines' decode steps are timed interleaved, round
by round (loadtest/harness.py), so that background load hits every context alike. Forward hooks
time each layer's token mixer: the linear-attention layers, the full-attention layers, and the
rest of the step (MoE blocks, norms, LM head, sampling, scheduling). The linear-attention time
should stay flat as the context grows (a fixed-size state per sequence), the attention time grow.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### Hybrid model decode vs context (CPU)"


def build(path: Path, layers: int, hidden: int, max_len: int) -> None:
    import torch
    import transformers

    from loadtest.checkpoints import save_tokenizer

    cfg = transformers.Qwen3NextConfig(
        vocab_size=4096, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_conv_kernel_dim=4, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden // 2, num_experts=16,
        num_experts_per_tok=2, max_position_embeddings=max_len, full_attention_interval=4)
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    save_tokenizer(path, cfg.vocab_size)


class MixerTimer:
    """Wall time spent in the token mixers of one model, by kind, between `reset` calls."""

    def __init__(self, model) -> None:
        self.spent = {"linear": 0.0, "attention": 0.0}
        self._start = 0.0
        for i, layer in enumerate(model.layers):
            kind = "linear" if model.config.layer_kind(i) != "attention" else "attention"
            layer.attn.register_forward_pre_hook(self._enter)
            layer.attn.register_forward_hook(lambda mod, inp, out, kind=kind: self._leave(kind))

    def _enter(self, mod, inp) -> None:
        self._start = time.perf_counter()

    def _leave(self, kind: str) -> None:
        self.spent[kind] += time.perf_counter() - self._start

    def reset(self) -> dict[str, float]:
        out, self.spent = self.spent, {k: 0.0 for k in self.spent}
        return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest hybrid-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per context and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, help="torch threads (default: the engine's)")
    ap.add_argument("--plot", help="also draw the split as a PNG chart at this path")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    longest = max(args.contexts)
    total_steps = (args.rounds + 1) * args.steps + 2
    tmp = tempfile.TemporaryDirectory(prefix="hybrid-decode-")
    path = Path(tmp.name)
    build(path, args.layers, args.hidden, longest + total_steps + 16)
    engines, timers = {}, {}
    for ctx in args.contexts:
        t0 = time.perf_counter()
        llm = LLM(str(path), dtype="float32", max_num_seqs=1, max_num_batched_tokens=2048,
                  max_model_len=longest + total_steps + 16, kv_cache_memory=256 << 20)
        core = llm.core
        prompt = torch.randint(10, 4000, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
        core.add_request(EngineRequest(f"ctx{ctx}", prompt,
                                       SamplingParams(temperature=0.0, max_tokens=total_steps, ignore_eos=True)))
        while core.scheduler.running == [] or core.scheduler.running[0].num_computed < ctx:
            core.step()  # the prompt, in chunks of 2048
        engines[ctx], timers[ctx] = core, MixerTimer(core.model)
        print(f"context {ctx}: prefilled in {time.perf_counter() - t0:.1f} s", flush=True)
    plan = engines[args.contexts[0]].model.kernel_plan
    split: dict[int, dict[str, list[float]]] = {c: {"linear": [], "attention": []} for c in args.contexts}

    def steps(ctx: int):
        def run():
            timers[ctx].reset()
            for _ in range(args.steps):
                engines[ctx].step()
            spent = timers[ctx].reset()
            for k, v in spent.items():
                split[ctx][k].append(v / args.steps)
        return run

    samples = interleave({f"ctx{c}": steps(c) for c in args.contexts}, rounds=args.rounds, warmup=1,
                         number=1)
    result = results.new_result("hybrid-decode", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING)
    rows, points = [], []
    for ctx in args.contexts:
        s = samples[f"ctx{ctx}"].summary()
        step_ms = s["wall_median_s"] / args.steps * 1e3
        lin = sorted(split[ctx]["linear"])[len(split[ctx]["linear"]) // 2] * 1e3
        att = sorted(split[ctx]["attention"])[len(split[ctx]["attention"]) // 2] * 1e3
        rows.append([ctx, step_ms, lin, att, step_ms - lin - att, f"{lin / step_ms:.0%}", f"{att / step_ms:.0%}"])
        points.append({"context": ctx, "step_ms": step_ms, "linear_ms": lin, "attention_ms": att})
        print(f"context {ctx}: {step_ms:.2f} ms/token (linear attention {lin:.2f}, full attention {att:.2f})",
              flush=True)
    result["measurements"] = {"kernel_plan": plan.to_dict(), "points": points,
                              "samples": {k: v.to_json() for k, v in samples.items()},
                              "split": {str(k): v for k, v in split.items()}}
    linear_layers = sum(k == "linear" for k in engines[args.contexts[0]].model.config.layer_kinds)
    result["summary"]["blocks"] = [
        results.text(f"A random-weight Qwen3-Next-shaped model (hidden {args.hidden}, {args.layers} layers: "
                     f"{linear_layers} Gated DeltaNet, {args.layers - linear_layers} gated full attention; 16 "
                     f"experts top-2 with a shared expert), float32, {torch.get_num_threads()} thread(s), batch 1. "
                     f"Per context: median over {args.rounds} interleaved rounds of {args.steps} decode steps; the "
                     "token mixers timed by forward hooks."),
        results.table(None, [results.column("context", "d"), results.column("ms/token", ".2f"),
                             results.column("linear attention (ms)", ".2f"), results.column("full attention (ms)", ".2f"),
                             results.column("rest (ms)", ".2f"), results.column("linear share"),
                             results.column("attention share")], rows),
        {"kind": "note"},
    ]
    if args.plot:
        plot(points, Path(args.plot))
        result["measurements"]["plot"] = args.plot
    output.finish(result, args)
    tmp.cleanup()
    return result


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [p["context"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ctx, [p["linear_ms"] for p in points], "o-", label="linear attention layers")
    ax.plot(ctx, [p["attention_ms"] for p in points], "s-", label="full attention layers")
    ax.plot(ctx, [p["step_ms"] for p in points], "^--", label="whole decode step")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ctx, [str(c) for c in ctx])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per token")
    ax.set_title("Hybrid model decode on the CPU, by layer kind")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
