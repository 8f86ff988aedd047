"""Random-weight models built in device memory, a decode-throughput harness over EngineCore,
and bench_gpu.py's timing helpers and report.

For loadtest/bench_gpu.py: the shapes of Mixtral-8x7B and Qwen3-30B-A3B cut to a few layers
(every per-layer shape real), initialised on the device (no checkpoint on disk: 24 GB of
safetensors would take longer to write than the benchmark runs). The harness times each
engine step and, per decode step, counts the bytes it must read (dense weights, the distinct
experts its tokens were routed to, the KV cache), for memory-bandwidth utilisation.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
import transformers

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
        t0 = time.perf_counter()
        out = orig(b)
        if cuda:  # the sampler syncs right after anyway; this splits the step into GPU and the rest
            torch.cuda.synchronize()
        seen["exec"] = time.perf_counter() - t0
        seen["decode"] = all(it.num_new == 1 for it in b.scheduled)
        seen["n"] = len(b.scheduled)
        seen["ctx"] = sum(it.seq.num_computed + 1 for it in b.scheduled)
        seen["routing"], seen["bucket"] = out.routing, out.graph_bucket
        return out

    core.runner.execute = execute
    pending = []
    try:
        while core.has_unfinished():
            t0 = time.perf_counter()
            core.step()  # ends in the sampler's read of the tokens: the step's GPU work is done
            dt = time.perf_counter() - t0
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
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)  # 1 GiB
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() / sorted(times[2:])[len(times[2:]) // 2]


def median_ms(fn, dev: str) -> float:
    if dev == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=30, return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def report(out: dict) -> str:
    lines = [f"device: {out['device']}; copy bandwidth {out['copy_GBps']} GB/s (read + write); MBU against "
             f"{out['peak_GBps']} GB/s", ""]
    for r in out["engines"]:
        lines += [f"### {r['shape']} ({r['layers']} layers, {r['params_B']}B parameters)", "",
                  "| batch | output tok/s | ms/step | execute ms | rest ms | GB/step | MBU | eager tok/s "
                  "| transformers tok/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        eager = {e["batch"]: e for e in r.get("eager", [])}
        hf = {h["batch"]: h for h in out.get("transformers", {}).get(r["shape"], []) if "output_tok_per_s" in h}
        for s in r["graphs"]:
            B = s["batch"]
            lines.append(f"| {B} | {s['output_tok_per_s']} | {s['ms_per_step']} | {s['execute_ms_per_step']} | "
                         f"{s['rest_of_step_ms']} | {s['bytes_per_step'] / 1e9:.2f} | "
                         f"{s['mbu'] * 100:.1f}% | {eager.get(B, {}).get('output_tok_per_s', '')} | "
                         f"{hf.get(B, {}).get('output_tok_per_s', '')} |")
        lines.append("")
    if out.get("moe_kernels"):
        lines += ["| MoE layer | tokens | backend | ms | GB/s of experts | rel. err |", "|---|---:|---|---:|---:|---:|"]
        for m in out["moe_kernels"]:
            lines.append(f"| {m['shape']} | {m['tokens']} | {m['backend']} | {m.get('ms', m.get('error'))} | "
                         f"{m.get('experts_GBps', '')} | {m.get('rel_err_vs_reference', '')} |")
    return "\n".join(lines)
