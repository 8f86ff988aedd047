"""Decode cost per active weight byte of the gpt-oss- and DeepSeek-V3-shaped models against the Mixtral-shaped one (CPU).

    python -m loadtest family-decode [--concurrency 1 16] [--steps 8] [--rounds 5] [--prompt 256]
        [--threads N] [--repo DIR] [--label before]

Three random-weight models with the hidden size, layers and expert shapes of the 140M
Mixtral-shaped benchmark model (loadtest/checkpoints.py `mixtral-140m`: hidden 512, 8 layers, 8
experts of intermediate 1024, top-2, vocabulary 32000), saved by transformers and served by the
native engine in float32 on the CPU:
- mixtral: that model (GQA 8 heads / 4 KV heads of 64, plain SwiGLU experts, softmax top-2);
- gpt-oss: sliding-window (128) layers alternating with full ones, attention sinks, q/k/v/o
  biases, a router with a bias, experts with biases and the clamped SwiGLU (limit 7.0);
- deepseek-v3: MLA (8 heads, q_lora 384, kv_lora 256, nope 64 + rope 32, v 64), one shared expert
  of intermediate 1024 on every layer, the sigmoid router with the correction bias and grouped
  top-2 (4 groups, best 2), routed scaling 2.5.
For each concurrency C, each engine holds C sequences prefilled with `--prompt` random tokens
and the three engines' decode steps are timed interleaved, round by round (loadtest/harness.py),
so that background load hits each alike. Reported per model and concurrency: the median step
time, that time divided by the model's active weight bytes (the float32 weights one token reads:
everything but the embedding table's other rows and the experts it does not route to, counted at
top_k / num_experts of the expert stacks) and its ratio to Mixtral's (the goal: <= 1.15).

`--repo DIR` measures another checkout's engine (e.g. main before a change, exported with
`git archive`): the timing runs in a child process with DIR's models/ and server/ first on the
path; the checkpoints and the table come from this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEADING = "### Family decode: gpt-oss and DeepSeek-V3 shapes vs Mixtral (CPU)"
FAMILIES = ("mixtral", "gpt-oss", "deepseek-v3")
# the 140M benchmark model's sizes (loadtest/checkpoints.py "mixtral-140m"), shared by all three
BASE = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=4096,
            bos_token_id=0, eos_token_id=1, pad_token_id=2)
EXPERTS = 8
TOP_K = 2
INTER = 1024
WINDOW = 128


def hf_config(family: str):
    import transformers

    if family == "mixtral":
        return transformers.MixtralConfig(**BASE, num_key_value_heads=4, intermediate_size=INTER,
                                          num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    if family == "gpt-oss":
        return transformers.GptOssConfig(**BASE, num_key_value_heads=4, head_dim=64, intermediate_size=INTER,
                                         num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=WINDOW,
                                         swiglu_limit=7.0, rope_parameters=dict(rope_type="default", rope_theta=1e4))
    if family == "deepseek-v3":
        return transformers.DeepseekV3Config(**BASE, num_key_value_heads=8, intermediate_size=INTER,
                                             moe_intermediate_size=INTER, n_routed_experts=EXPERTS, n_shared_experts=1,
                                             num_experts_per_tok=TOP_K, first_k_dense_replace=0, n_group=4,
                                             topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                                             qk_rope_head_dim=32, v_head_dim=64)
    raise ValueError(family)


def make_model(family: str) -> str:
    """The family's random-weight checkpoint, written once under the benchmark cache."""
    import torch
    import transformers

    from loadtest.checkpoints import CACHE, save_tokenizer

    path = CACHE / f"family-decode-{family}"
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = hf_config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases and the correction bias start at zero: give them values
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("bias", "_bias")) and t.is_floating_point():
                t.normal_(0.0, 0.02)
    print(f"[bench] writing random-weight {family} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters) to {path}", flush=True)
    model.save_pretrained(str(path))
    save_tokenizer(path, cfg.vocab_size)
    return str(path)


def active_bytes(model) -> int:
    """Bytes of the weights one decode token reads: the expert stacks at top_k / num_experts,
    one row of the embedding table (unless tied to the LM head), everything else whole."""
    cfg = model.config
    total = 0.0
    tied = model.lm_head.weight is model.embed.weight
    for name, p in model.named_parameters():
        n = float(p.numel())
        if name.endswith((".w13", ".w2")) and ".moe." in f".{name}" and p.dim() == 3:
            n *= cfg.top_k / cfg.num_experts
        elif name == "embed.weight" and not tied:
            n = float(p.shape[1])
        total += n * p.element_size()
    return int(total)


# -- the timing (in this process, or in a child run with another checkout's engine) -------------
def measure(paths: dict[str, str], concurrency: list[int], steps: int, rounds: int, prompt: int,
            threads: int | None = None) -> dict:
    import random

    import torch

    if threads:
        torch.set_num_threads(threads)
    from loadtest.harness import interleave
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    budget = (rounds + 2) * steps + 8
    cores, out = {}, {"threads": torch.get_num_threads(), "families": {}}
    for fam, path in paths.items():
        # a KV pool for the sequences measured, no more: three engines share the machine's memory
        llm = LLM(path, dtype="float32", max_num_seqs=max(concurrency), max_num_batched_tokens=4096,
                  max_model_len=prompt + budget + 16, kv_cache_memory=192 << 20)
        cores[fam] = llm.core
        model = llm.core.model
        plan = getattr(model, "kernel_plan", None)
        out["families"][fam] = {"active_bytes": active_bytes(model), "kernel_plan": plan.table() if plan else None,
                                "points": {}}
        print(f"{fam}: loaded, {active_bytes(model) / 2**20:.1f} MiB of active weights", flush=True)
    for c in concurrency:
        rng = random.Random(c)
        for fam, core in cores.items():
            for i in range(c):
                core.add_request(EngineRequest(f"c{c}-{i}", [rng.randrange(3, 30000) for _ in range(prompt)],
                                               SamplingParams(temperature=0.0, max_tokens=budget, ignore_eos=True)))
            t0 = time.perf_counter()
            while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
                core.step()
            print(f"{fam} c={c}: prefilled in {time.perf_counter() - t0:.1f} s", flush=True)

        def run(core):
            def f():
                for _ in range(steps):
                    core.step()
            return f

        samples = interleave({fam: run(core) for fam, core in cores.items()}, rounds=rounds, warmup=1)
        for fam, core in cores.items():
            assert len(core.scheduler.running) == c, f"{fam}: {len(core.scheduler.running)} sequences running, not {c}"
            walls = [w / steps for w in samples[fam].wall]
            out["families"][fam]["points"][str(c)] = {"step_s": walls}
            for i in range(c):
                core.abort(f"c{c}-{i}")
            while core.has_unfinished():
                core.step()
    return out


def child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec")
    spec = json.loads(ap.parse_args(argv).spec)
    got = measure(**spec)
    print("FAMILY-DECODE-RESULT " + json.dumps(got), flush=True)


def run_in(repo: Path, spec: dict) -> dict:
    """`measure` in a child process whose models/ and server/ come from `repo`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--spec", json.dumps(spec)], cwd=repo,
                          env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAMILY-DECODE-RESULT ")]
    print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("FAMILY-DECODE-RESULT ")), flush=True)
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the run in {repo} failed (exit {proc.returncode})")
    return json.loads(lines[-1].split(" ", 1)[1])


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def rows_of(got: dict, concurrency: list[int]) -> list[list]:
    rows = []
    for c in concurrency:
        base = None
        for fam in FAMILIES:
            f = got["families"][fam]
            step = median(f["points"][str(c)]["step_s"])
            per_byte = step / f["active_bytes"]
            base = per_byte if fam == "mixtral" else base
            rows.append([c, fam, f["active_bytes"] / 2**20, step * 1e3, per_byte * 1e12, per_byte / base])
    return rows


def main(argv: list[str] | None = None) -> dict:
    from loadtest import output, results

    ap = argparse.ArgumentParser(prog="python -m loadtest family-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timed sample")
    ap.add_argument("--rounds", type=int, default=5, help="timed samples per model and concurrency")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence (the context)")
    ap.add_argument("--threads", type=int, help="torch threads (default: the engine's); 1 steadies the ratios on a "
                    "machine other jobs load")
    ap.add_argument("--repo", help="measure this checkout's engine (default: this one)")
    ap.add_argument("--label", help="names the result's docs section (family-decode-<label>), e.g. before / after")
    output.add_args(ap)
    args = ap.parse_args(argv)
    paths = {fam: make_model(fam) for fam in FAMILIES}
    spec = dict(paths=paths, concurrency=args.concurrency, steps=args.steps, rounds=args.rounds, prompt=args.prompt,
                threads=args.threads)
    repo = Path(args.repo).resolve() if args.repo else REPO
    got = run_in(repo, spec) if args.repo else measure(**spec)
    section = "family-decode" + (f"-{args.label}" if args.label else "")
    result = results.new_result("family-decode", argv, vars(args), heading=HEADING, section=section)
    result["measurements"] = {**got, "repo": str(repo), "repo_git": results.git_info(repo)}
    rows = rows_of(got, args.concurrency)
    col = results.column
    label = f" ({args.label})" if args.label else ""
    result["summary"]["blocks"] = [
        results.text(f"Engine{label}: {repo}. Float32, {got['threads']} thread(s); per model and concurrency the "
                     f"median of {args.rounds} interleaved samples of {args.steps} decode steps, context ~{args.prompt} "
                     "tokens. ps/byte: step time per byte of active weights (one token's); ratio: to Mixtral's "
                     "(goal <= 1.15)."),
        results.table(None, [col("concurrency", "d"), col("model"), col("active MiB", ".1f"),
                             col("step ms", ".2f"), col("ps/byte", ".1f"), col("ratio to mixtral", ".2f")], rows),
        {"kind": "note"},
    ]
    output.finish(result, args)
    return result


if __name__ == "__main__":  # the child of --repo (run with -P: this directory's modules never shadow the checkout's)
    child_main(sys.argv[1:])
