"""Random-weight models built in device memory, decode runs over EngineCore timed step by step,
and the report blocks of `python -m loadtest gpu`.

For loadtest/benches/gpu.py: the shapes of Mixtral-8x7B and Qwen3-30B-A3B cut to a few layers
(every per-layer shape real), initialised on the device (no checkpoint on disk: 24 GB of
safetensors would take longer to write than the benchmark runs). The harness times each
engine step and, per decode step, counts the bytes it must read (dense weights, the distinct
experts its tokens were routed to, the KV cache), for memory-bandwidth utilisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import transformers

from loadtest import results
from loadtest.harness import Clock, interleave
from models.hf_config import from_hf_config
from models.kernels.plan import resolve_plan
from models.model import MoEForCausalLM

SHAPES = {
    "mixtral-8x7b": ("MixtralForCausalLM", transformers.MixtralConfig, dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
        sliding_window=None)),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=32768,
        rope_theta=1e6, tie_word_embeddings=False)),
}


# --cpu-dry-run: the same code paths at toy sizes (expert and head counts kept)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, head_dim=16,
            num_attention_heads=8)


def hf_config(shape: str, num_layers: int, dtype: torch.dtype, tiny: bool = False):
    arch, cls, kw = SHAPES[shape]
    if tiny:
        kw = {**kw, **{k: v for k, v in TINY.items() if k in kw or k == "head_dim"}}
    cfg = cls(**kw, num_hidden_layers=num_layers, bos_token_id=0, eos_token_id=1)
    cfg.architectures = [arch]
    cfg.dtype = dtype
    return arch, cfg


@torch.no_grad()
def random_model(shape: str, num_layers: int, dtype: torch.dtype, device: str, seed: int = 0,
                 tiny: bool = False) -> MoEForCausalLM:
    arch, hf = hf_config(shape, num_layers, dtype, tiny)
    cfg = from_hf_config(hf, arch)
    with torch.device("meta"):
        model = MoEForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or p.dim() == 1 and "bias" not in name:
            p.fill_(1.0)
        elif "bias" in name:
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    model.rotary.reset_parameters()
    model.apply_plan(resolve_plan(cfg, torch.device(device), dtype))
    return model.eval()


@dataclass
class ByteModel:
    """Bytes one decode step must read from device memory."""

    dense: int  # every non-expert weight but the embedding table (one row per token is read)
    embed_row: int
    expert: int  # one expert's w13 + w2
    kv_per_token: int  # K and V of one token, all layers

    @classmethod
    def of(cls, model: MoEForCausalLM) -> ByteModel:
        cfg = model.config
        elem = model.embed.weight.element_size()
        expert_params = sum(b.w13.numel() + b.w2.numel() for b in model.moe_blocks())
        total = sum(p.numel() for p in model.parameters())
        embed = model.embed.weight.numel() if not cfg.tie_word_embeddings else 0
        return cls(dense=(total - expert_params - embed) * elem, embed_row=cfg.hidden_size * elem,
                   expert=3 * cfg.hidden_size * cfg.moe_intermediate_size * elem,
                   kv_per_token=model.kv_bytes_per_block(1))


@dataclass
class DecodeRun:
    batch: int
    step_seconds: list[float] = field(default_factory=list)
    step_bytes: list[int] = field(default_factory=list)
    buckets: list = field(default_factory=list)
    execute_seconds: list[float] = field(default_factory=list)  # runner.execute (forward + sampling) until the GPU is done
    prefill_seconds: float = 0.0

    def summary(self, peak_bw: float) -> dict:
        n = len(self.step_seconds)
        t = sum(self.step_seconds)
        mean_bytes = sum(self.step_bytes) / max(n, 1)
        step = t / max(n, 1)
        return {"batch": self.batch, "decode_steps": n, "decode_seconds": round(t, 4),
                "output_tok_per_s": round(self.batch * n / t, 1) if t else None,
                "ms_per_step": round(step * 1e3, 3), "bytes_per_step": int(mean_bytes),
                "achieved_GBps": round(mean_bytes / step / 1e9, 1) if t else None,
                "mbu": round(mean_bytes / step / peak_bw, 4) if t else None,
                "execute_ms_per_step": round(sum(self.execute_seconds) / max(n, 1) * 1e3, 3),
                "rest_of_step_ms": round((t - sum(self.execute_seconds)) / max(n, 1) * 1e3, 3),
                "cuda_graph_buckets": sorted({b for b in self.buckets if b is not None}),
                "eager_decode_steps": sum(1 for b in self.buckets if b is None),
                "prefill_seconds": round(self.prefill_seconds, 3)}


def decode_run(core, batch: int, prompt_len: int, output_len: int, bytes_model: ByteModel, seed: int = 0) -> DecodeRun:
    """Run `batch` requests (random prompt ids, greedy, ignore_eos) to the end; time every step."""
    from server.engine.request import EngineRequest, SamplingParams

    rng = random.Random(seed)
    vocab = core.model.config.vocab_size
    for i in range(batch):
        ids = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        core.add_request(EngineRequest(f"b{batch}-{seed}-{i}", ids,
                                       SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)))
    run = DecodeRun(batch)
    seen: dict = {}
    orig = core.runner.execute

    cuda = core.runner.device.type == "cuda"

    def execute(b):  # records references only: the counting happens after the timed loop
        # synchronized after (the sampler syncs right after anyway): splits the step into GPU and the rest
        with Clock(core.runner.device if cuda else None, cpu=False) as clock:
            out = orig(b)
        seen["exec"] = clock.wall
        seen["decode"] = all(it.num_new == 1 for it in b.scheduled)
        seen["n"] = len(b.scheduled)
        seen["ctx"] = sum(it.seq.num_computed + 1 for it in b.scheduled)
        seen["routing"], seen["bucket"] = out.routing, out.graph_bucket
        return out

    core.runner.execute = execute
    pending = []
    try:
        while core.has_unfinished():
            with Clock(cpu=False) as clock:
                core.step()  # ends in the sampler's read of the tokens: the step's GPU work is done
            dt = clock.wall
            if seen.get("decode") and seen["n"] == batch:  # full-batch decode steps only
                run.step_seconds.append(dt)
                run.buckets.append(seen["bucket"])
                run.execute_seconds.append(seen["exec"])
                pending.append((seen["routing"], seen["ctx"]))
            else:
                run.prefill_seconds += dt
    finally:
        core.runner.execute = orig
    E = core.model.config.num_experts
    for routing, ctx in pending:
        distinct = 0
        if routing is not None:
            L = routing.shape[1]
            flat = (routing + torch.arange(L, device=routing.device)[None, :, None] * E).reshape(-1)
            distinct = int(torch.unique(flat).numel())
        run.step_bytes.append(bytes_model.dense + routing.shape[0] * bytes_model.embed_row
                              + distinct * bytes_model.expert + ctx * bytes_model.kv_per_token)
    return run


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (median of 10, GPU time)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    t = interleave({"copy": lambda: y.copy_(x)}, rounds=10, warmup=2, device="cuda")["copy"].summary()
    return 2 * x.numel() / t["gpu_median_s"]


def median_ms(fn, dev: str) -> float:
    """The median time of `fn` in ms: GPU time between CUDA events on CUDA (30 samples after 5
    warm-up calls), wall time on the CPU (3 samples after one)."""
    cuda = dev == "cuda"
    t = interleave({"fn": fn}, rounds=30 if cuda else 3, warmup=5 if cuda else 1, device=dev)["fn"].summary()
    return t["gpu_median_s" if cuda else "wall_median_s"] * 1e3


def report_blocks(out: dict) -> list[dict]:
    """The docs blocks of a run: per model shape, the decode table; then the MoE kernels."""
    col = results.column
    blocks = [results.text(f"Device: {out['device']}; copy bandwidth {out['copy_GBps']} GB/s (read + write); MBU "
                           f"against {out['peak_GBps']} GB/s. Random-weight models with the real per-layer shapes, "
                           "cut to a few layers; `batch` requests of random prompt tokens, greedy, `ignore_eos`, "
                           "through `EngineCore` (scheduler, runner with CUDA graphs, sampler, detokenizer); tok/s "
                           "over the decode steps that ran the full batch.")]
    for r in out["engines"]:
        eager = {e["batch"]: e for e in r.get("eager", [])}
        hf = {h["batch"]: h for h in out.get("transformers", {}).get(r["shape"], []) if "output_tok_per_s" in h}
        rows = [[s["batch"], s["output_tok_per_s"], s["ms_per_step"], s["execute_ms_per_step"], s["rest_of_step_ms"],
                 s["bytes_per_step"] / 1e9, None if s["mbu"] is None else s["mbu"] * 100,
                 eager.get(s["batch"], {}).get("output_tok_per_s"), hf.get(s["batch"], {}).get("output_tok_per_s")]
                for s in r["graphs"]]
        blocks.append(results.table(
            f"**{r['shape']}** ({r['layers']} layers, {r['params_B']}B parameters)",
            [col("batch", "d"), col("output tok/s", ",.1f"), col("ms/step", ".2f"), col("execute ms", ".2f"),
             col("rest ms", ".2f"), col("GB/step", ".2f"), col("MBU %", ".1f"), col("eager tok/s", ",.1f"),
             col("transformers tok/s", ",.1f")], rows))
        if r.get("async_scheduling"):
            blocks.append(results.table(
                f"**{r['shape']}, `--async-scheduling`** (the same engine with CUDA graphs, runs alternating; tok/s "
                "once every request has its first token)",
                [col("batch", "d"), col("async scheduling"), col("run", "d"), col("output tok/s", ",.1f"),
                 col("ms/step", ".2f")],
                [[a["batch"], "on" if a["async_scheduling"] else "off", a["run"], a["output_tok_per_s"],
                  a["ms_per_step"]] for a in r["async_scheduling"]]))
        if r.get("skipped"):
            blocks.append(results.text("Skipped: " + "; ".join(r["skipped"]) + "."))
    if out.get("moe_kernels"):
        blocks.append(results.table(
            "**MoE layer alone** (one layer's experts, random routing; median; error = relative L2 against the "
            "reference):",
            [col("MoE layer"), col("tokens", "d"), col("backend"), col("ms", ".4f"), col("GB/s of experts", ".1f"),
             col("rel. err", ".5f")],
            [[m["shape"], m["tokens"], m["backend"], m.get("ms"), m.get("experts_GBps"),
              m.get("rel_err_vs_reference")] if "ms" in m else
             [m["shape"], m["tokens"], m["backend"], None, None, m.get("error")] for m in out["moe_kernels"]]))
    for q in out.get("quant_moe", []):
        if "rows" not in q:
            blocks.append(results.text(f"Quantized {q['shape']}: {q.get('skipped') or q.get('error')}"))
            continue
        blocks.append(results.table(
            f"**{q['shape']}: quantized MoE layers** ({q['layers']} layers of {q['experts']} experts top-"
            f"{q['top_k']}, H {q['hidden']}, I {q['inter']}, `{q['format']}`{' W8A8' if q.get('w8a8') else ''}; "
            f"resident {q['resident_bytes'] / 1e9:.2f} GB = {q['resident_over_format']}x the format's "
            f"{q['format_bytes'] / 1e9:.2f} GB, bf16 {q['bf16_bytes_same_shapes'] / 1e9:.2f} GB; bf16 timed over "
            f"{q.get('bf16_layers_measured')} layers, scaled; experts only, median):",
            [col("batch", "d"), col("ms all layers", ".3f"), col("MoE tok/s", ",.1f"), col("GB/s", ".1f"),
             col("MBU %", ".1f"), col("bf16 ms/layer", ".4f"), col("bf16 tok/s", ",.1f"), col("bf16 MBU %", ".1f"),
             col("x bf16", ".2f")],
            [[r["batch"], r["ms_all_layers"], r["moe_tok_per_s"], r["achieved_GBps"], r["mbu"] * 100,
              r.get("bf16_ms_per_layer"), r.get("bf16_moe_tok_per_s"),
              None if r.get("bf16_mbu") is None else r["bf16_mbu"] * 100, r.get("speedup_vs_bf16")]
             for r in q["rows"]]))
    if out.get("errors"):
        blocks.append(results.text("Errors: " + "; ".join(out["errors"])))
    blocks.append({"kind": "note"})
    return blocks
