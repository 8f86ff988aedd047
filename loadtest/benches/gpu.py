"""GPU decode of the native engine (bf16): tok/s, MBU, CUDA graphs vs eager, transformers, the MoE kernels.

    python -m loadtest gpu [--models mixtral-8x7b,qwen3-30b-a3b] [--layers 8]
        [--batches 1,4,16,64,256] [--prompt-len 128] [--output-len 64] [--hf-batches 1,64]
        [--no-expert-tier] [--async-batches 256] [--time-budget 300] [--json out.json] [--cpu-dry-run]
        [--quant-models deepseek-v3-fp8,gpt-oss-120b-mxfp4,qwen3-30b-a3b-int4,mixtral-8x7b-fp8] [--quant-batches 1,16,64,256]

Random-weight models with the real per-layer shapes of Mixtral-8x7B and Qwen3-30B-A3B, cut
to --layers layers, built in GPU memory (loadtest/benches/gpu_models.py). For each: decode output
tok/s of the engine (EngineCore: scheduler, runner with CUDA graphs, sampler, detokenizer)
at each batch size, the bytes each decode step must read (dense weights + the distinct
experts its tokens were routed to + KV), and memory-bandwidth utilisation (MBU) against the
device's peak (--peak-gbps, default the H200's 4800 GB/s; a device-to-device copy is measured
too); the same engine with --enforce-eager; transformers `generate` at --hf-batches; the MoE
kernels one against the other; a torch.profiler breakdown at batch 1; `--async-scheduling`
against the synchronous engine at --async-batches (default 256) on --async-shape; and the CPU expert
tier (--gpu-expert-budget at half the experts). Sections that would overrun --time-budget
are skipped and say so. Timings by loadtest/harness.py (CUDA events and synchronization). Writes
one JSON result (after each model shape, so a run cut short keeps what it measured) and prints
its docs block. `--cpu-dry-run` runs every section on the CPU at toy sizes (float32), to check
the benchmark without a GPU (scripts/gpu_check.sh with GPU_CHECK_DRY_RUN=1).
Then the quantized MoE layers (loadtest/benches/gpu_quant.py: FP8 block, MXFP4, INT4 experts through
the Triton kernels of models/kernels/triton_qmoe.py, against bf16; resident bytes vs the formats'
bytes), `quant_moe` in the JSON; `--models none` measures only those, `--quant-models ""` skips them.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import time
from pathlib import Path

import torch

from loadtest import output, results
from loadtest.benches.gpu_models import (ByteModel, copy_bandwidth, decode_run, hf_config, median_ms, random_model,
                                         report_blocks)
from loadtest.harness import Clock

HEADING = "## GPU: native engine decode, bf16"

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench_gpu {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def left(args) -> float:
    return args.time_budget - (time.monotonic() - T0)


def moe_kernels(shape: str, batches: list[int], args) -> list[dict]:
    """One MoE layer's experts: each backend's median time, and its error against the reference."""
    from models.kernels.fused_moe import fused_experts
    from models.kernels.plan import Capabilities

    dev, dtype = args.device, args.dtype
    _, hf = hf_config(shape, 1, dtype, args.cpu_dry_run)
    H = hf.hidden_size
    inter = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
    E = getattr(hf, "num_local_experts", None) or hf.num_experts
    k = hf.num_experts_per_tok
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * inter, H, device=dev, dtype=dtype, generator=g) * 0.02
    w2 = torch.randn(E, H, inter, device=dev, dtype=dtype, generator=g) * 0.02
    rows = []
    grouped = Capabilities.detect(w13.device, w13.dtype).grouped_mm if dev == "cuda" else False
    backends = ["triton", "reference"] + (["grouped_mm"] if grouped else [])
    if dev == "cpu":
        backends = ["loop", "reference"]
    for T in batches:
        x = torch.randn(T, H, device=dev, dtype=dtype, generator=g)
        w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1).topk(k, -1)
        distinct = int(torch.unique(ids).numel())
        ref = fused_experts(x, w13, w2, ids, w, "reference").float()
        for be in backends:
            try:
                out = fused_experts(x, w13, w2, ids, w, be).float()
                err = ((out - ref).norm() / ref.norm()).item()
                ms = median_ms(lambda: fused_experts(x, w13, w2, ids, w, be), dev)
            except Exception as e:  # noqa: BLE001 (a backend that fails here is reported, not fatal)
                rows.append({"shape": shape, "tokens": T, "backend": be, "error": repr(e)[:300]})
                continue
            gbps = distinct * 3 * H * inter * w13.element_size() / (ms / 1e3) / 1e9
            rows.append({"shape": shape, "tokens": T, "backend": be, "ms": round(ms, 4),
                         "experts_GBps": round(gbps, 1), "rel_err_vs_reference": round(err, 5)})
            log(f"moe {shape} T={T} {be}: {ms:.3f} ms ({gbps:.0f} GB/s of expert weights) err {err:.2e}")
    if dev == "cuda" and args.moe_sweep:  # other tile shapes for the record (defaults: tile_config)
        from models.kernels.triton_moe import fit_shared_memory, fused_moe_triton, tile_config

        for T in (1, 256):
            x = torch.randn(T, H, device=dev, dtype=dtype, generator=g)
            w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=g), -1).topk(k, -1)
            base = tile_config(T * k, E, dev)
            for change in ({}, {"BLOCK_N": 32}, {"BLOCK_N_DOWN": 64}, {"BLOCK_N": 128, "BLOCK_K": 64},
                           {"BLOCK_M": 32}, {"GROUP_M": 1}, {"num_stages": 3}, {"num_warps": 8}):
                cfg = fit_shared_memory({**base, **change}, 2)
                try:
                    ms = median_ms(lambda: fused_moe_triton(x, w13, w2, ids, w, cfg), dev)
                except Exception as e:  # noqa: BLE001
                    rows.append({"shape": shape, "tokens": T, "backend": f"triton {change}", "error": repr(e)[:200]})
                    continue
                rows.append({"shape": shape, "tokens": T, "backend": f"triton {change or 'default'}",
                             "ms": round(ms, 4), "config": cfg})
                log(f"moe sweep {shape} T={T} {change or 'default'}: {ms:.3f} ms")
                if left(args) < 20:
                    break
    return rows


def make_core(model, tokenizer, max_batch: int, max_len: int, eager: bool, block_size: int = 16, placement=None,
              async_scheduling: bool = False):
    """An EngineCore over `model`, its kernel plan resolved afresh and finished for the engine as
    server/engine/factory.py does (CUDA graphs unless `eager` or the host computes experts)."""
    from server.engine.native.core import EngineCore

    model.apply_plan(model.plan_kernels().for_engine(
        placed=placement is not None and placement.executor is not None, enforce_eager=eager,
        host_tier=placement is not None and getattr(placement, "computes_on_host", placement.host is not None),
        several_gpus=placement is not None and getattr(placement, "several_gpus", False)))
    blocks = max_batch * -(-max_len // block_size) + 16
    return EngineCore(model, tokenizer, num_blocks=blocks, block_size=block_size, max_model_len=max_len,
                      max_num_seqs=max_batch, max_num_batched_tokens=4096, seed=0, placement=placement,
                      async_scheduling=async_scheduling)


def steady_decode(core, batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """Output tok/s of `batch` greedy requests once every one of them has its first token (so
    the prefill steps are left out), to the end; works for the synchronous and the async engine
    alike (it reads only the outputs, as a server does)."""
    from server.engine.request import EngineRequest, SamplingParams

    rng = random.Random(seed)
    vocab = core.model.config.vocab_size
    for i in range(batch):
        core.add_request(EngineRequest(f"a{batch}-{seed}-{i}", [rng.randrange(3, vocab) for _ in range(prompt_len)],
                                       SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)))
    started: set[str] = set()
    tokens, steps, t0 = 0, 0, None
    while core.has_unfinished():
        outs = core.step()[0]
        n = sum(len(c.token_ids) for o in outs for c in o.outputs)
        if t0 is None:
            started.update(o.request_id for o in outs if any(c.token_ids for c in o.outputs))
            if len(started) == batch:
                t0 = time.perf_counter()
            continue
        tokens, steps = tokens + n, steps + 1
    dt = time.perf_counter() - t0 if t0 is not None else 0.0
    return {"batch": batch, "tokens": tokens, "steps": steps, "seconds": round(dt, 4),
            "output_tok_per_s": round(tokens / dt, 1) if dt else None,
            "ms_per_step": round(dt / steps * 1e3, 3) if steps else None}


def async_scheduling(model, tokenizer, args, max_len: int) -> list[dict]:
    """--async-scheduling against the synchronous engine (CUDA graphs both), alternating runs."""
    cores = {False: make_core(model, tokenizer, max(args.async_batches), max_len, eager=False),
             True: make_core(model, tokenizer, max(args.async_batches), max_len, eager=False, async_scheduling=True)}
    for core in cores.values():
        steady_decode(core, 2, 16, 4, seed=1)  # warm-up
    rows = []
    for B in args.async_batches:
        for rep in range(2):
            for flag in ((False, True) if rep == 0 else (True, False)):
                if left(args) < 15:
                    break
                s = steady_decode(cores[flag], B, args.prompt_len, args.output_len, seed=10 + rep)
                s.update(async_scheduling=flag, run=rep)
                rows.append(s)
                log(f"async scheduling {flag} B={B} run {rep}: {s['output_tok_per_s']} tok/s, {s['ms_per_step']} ms/step")
    for core in cores.values():
        core.close()
    return rows


def profile_batch1(core, args) -> dict:
    """torch.profiler over a batch-1 decode: CPU time per step vs GPU kernel time per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        run = decode_run(core, 1, args.prompt_len, 16, ByteModel.of(core.model), seed=99)
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    steps = len(run.step_seconds)
    gpu_us = sum(e.self_device_time_total for e in kernels)
    total_steps = steps + 1  # the prefill step
    return {"decode_steps": steps, "wall_ms_per_decode_step": round(sum(run.step_seconds) / steps * 1e3, 3),
            "gpu_kernel_ms_per_step_all_steps": round(gpu_us / 1e3 / total_steps, 3),
            "top_kernels": [{"name": e.key[:80], "ms_total": round(e.self_device_time_total / 1e3, 3),
                             "calls": e.count} for e in kernels[:12]]}


def bench_shape(shape: str, args, tokenizer, peak: float, out: dict) -> None:
    """Every section for one model shape, most important first; each one skipped when the
    time budget runs short, and a failure in one does not stop the others."""
    res: dict = {"shape": shape, "layers": args.layers, "graphs": [], "eager": []}
    out["engines"].append(res)
    model = random_model(shape, args.layers, args.dtype, args.device, tiny=args.cpu_dry_run)
    bm = ByteModel.of(model)
    res["params_B"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    res["bytes"] = {"dense": bm.dense, "expert": bm.expert, "kv_per_token": bm.kv_per_token}
    res["kernels"] = model.kernel_plan.to_dict()
    max_len = args.prompt_len + args.output_len + 16
    state: dict = {}

    def graphs():
        t = time.monotonic()
        state["core"] = core = make_core(model, tokenizer, max(args.batches), max_len, eager=False)
        res["startup_seconds_with_graph_capture"] = round(time.monotonic() - t, 1)
        log(f"{shape}: {res['params_B']}B params, kernels\n{model.kernel_plan.table()}\nengine ready in "
            f"{res['startup_seconds_with_graph_capture']}s")
        decode_run(core, 2, 16, 4, bm, seed=1)  # warm-up: prefill-shaped kernels compile here
        for B in args.batches:
            if left(args) < 15:
                res.setdefault("skipped", []).append(f"graphs batch {B}: time budget")
                continue
            s = decode_run(core, B, args.prompt_len, args.output_len, bm).summary(peak)
            res["graphs"].append(s)
            log(f"{shape} B={B}: {s['output_tok_per_s']} tok/s, {s['ms_per_step']} ms/step, MBU {s['mbu']}, "
                f"buckets {s['cuda_graph_buckets']}")

    def hf():
        out["transformers"][shape] = bench_transformers(shape, args)

    def async_():
        state.pop("core", None)
        gc.collect()
        res["async_scheduling"] = async_scheduling(model, tokenizer, args, max_len)

    def kernels():
        out.setdefault("moe_kernels", []).extend(moe_kernels(shape, [int(x) for x in args.moe_kernel_batches.split(",")],
                                                             args))

    def eager():
        core = make_core(model, tokenizer, max(args.eager_batches), max_len, eager=True)
        for B in args.eager_batches:
            if left(args) < 15:
                res.setdefault("skipped", []).append(f"eager batch {B}: time budget")
                continue
            s = decode_run(core, B, args.prompt_len, min(args.output_len, 32), bm).summary(peak)
            res["eager"].append(s)
            log(f"{shape} eager B={B}: {s['output_tok_per_s']} tok/s, {s['ms_per_step']} ms/step")

    def profile():
        res["profile_batch1"] = profile_batch1(state["core"], args)
        log(f"{shape} profile: {json.dumps(res['profile_batch1'])[:800]}")

    def tier():
        state.pop("core", None)
        gc.collect()
        res["expert_tier"] = expert_tier(model, tokenizer, args, bm, peak)

    sections = [("graphs", graphs, 0), ("transformers", hf, 45), ("moe_kernels", kernels, 25), ("eager", eager, 20),
                ("profile", profile, 20), ("async_scheduling", async_, 40), ("expert_tier", tier, 60)]
    for name, fn, need in sections:
        if name == "async_scheduling" and shape != args.async_shape:
            continue
        if name == "transformers" and shape not in args.hf_models.split(","):
            continue
        if name == "profile" and "core" not in state:
            continue
        if name == "expert_tier" and not (args.expert_tier and shape == args.expert_tier_shape
                                          and args.device == "cuda"):
            continue
        if left(args) < need:
            res.setdefault("skipped", []).append(f"{name}: time budget")
            log(f"{shape}: {name} skipped (time budget)")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (reported in the JSON; the other sections still run)
            import traceback

            traceback.print_exc()
            out.setdefault("errors", []).append(f"{name} {shape}: {e!r}"[:800])
            log(f"{name} {shape} FAILED: {e!r}")
    state.clear()
    sections.clear()  # the closures hold the model: free its GPU memory before the next shape
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def expert_tier(model, tokenizer, args, bm, peak) -> list[dict]:
    """--gpu-expert-budget at half the experts (the rest in host memory, the CPU tier: the C
    experts kernel on a worker thread, overlapped with the GPU's experts and shared expert). CUDA
    graphs where the plan allows them, piecewise (`cuda_graphs` in each row says whether that
    batch replayed them, `graph_pieces` how many graphs a step is)."""
    from server.engine.native.placement.manager import placement_from_config
    from server.config import EngineConfig

    E = model.config.num_experts
    max_len = args.prompt_len + 32 + 16
    placement = placement_from_config(model, EngineConfig(model="bench", gpu_expert_budget=str(E // 2),
                                                          cpu_expert_format=args.expert_tier_format))
    core = make_core(model, tokenizer, 16, max_len, eager=False, placement=placement)
    rows = []
    for B in (1, 16):
        if left(args) < 25:
            break
        s = decode_run(core, B, args.prompt_len, 16, bm).summary(peak)
        s["gpu_experts_per_layer"] = E // 2
        graphs = core.runner.graphs if core.model.kernel_plan.cuda_graphs else None
        bucket = graphs.bucket(B) if graphs is not None else None  # None past the tier's copy-in threshold
        s["cuda_graphs"] = bucket is not None
        s["graph_pieces"] = graphs.num_pieces.get(bucket) if bucket is not None else None  # piecewise: 2L + 1
        s["cpu_tier_kernel"] = "c" if any(st.host is not None and st.host.packed is not None
                                          for st in placement.executor.states.values()) else "loop"
        s["cpu_tier"] = placement.tier_info()  # format, bytes, in place
        rows.append(s)
        log(f"expert tier (half on GPU) B={B}: {s['output_tok_per_s']} tok/s")
    return rows


def bench_transformers(shape: str, args) -> list[dict]:
    import transformers

    arch, hf = hf_config(shape, args.layers, args.dtype, args.cpu_dry_run)
    cls = getattr(transformers, arch)
    with torch.device(args.device):
        ref = cls._from_config(hf, dtype=args.dtype).eval()
    ref.generation_config.eos_token_id = None
    rows = []
    for B in args.hf_batches:
        if left(args) < 30:
            rows.append({"batch": B, "skipped": "time budget"})
            continue
        n = 32 if B == 1 else 16
        ids = torch.randint(3, hf.vocab_size, (B, args.prompt_len), device=args.device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2)
        with torch.inference_mode():
            ref.generate(ids[:, :8], max_new_tokens=2, **{**kw, "attention_mask": torch.ones_like(ids[:, :8])})
            times = {}
            for m in (1, n):
                with Clock(args.device) as clock:
                    ref.generate(ids, max_new_tokens=m, min_new_tokens=m, **kw)
                times[m] = clock.wall
        tps = B * (n - 1) / (times[n] - times[1])
        rows.append({"batch": B, "decode_tokens": n - 1, "output_tok_per_s": round(tps, 1),
                     "ms_per_step": round((times[n] - times[1]) / (n - 1) * 1e3, 2)})
        log(f"transformers {shape} B={B}: {tps:.1f} tok/s")
    del ref
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--eager-batches", default="1,64")
    ap.add_argument("--hf-batches", default="1,64")
    ap.add_argument("--hf-models", default="mixtral-8x7b")
    ap.add_argument("--moe-kernel-batches", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--peak-gbps", type=float, default=4800.0)
    ap.add_argument("--no-expert-tier", dest="expert_tier", action="store_false")
    ap.add_argument("--moe-sweep", action="store_true", help="also time other Triton MoE tile shapes")
    ap.add_argument("--expert-tier-shape", default="qwen3-30b-a3b")
    ap.add_argument("--expert-tier-format", default="auto", help="--cpu-expert-format of the expert-tier section")
    ap.add_argument("--async-shape", default="mixtral-8x7b", help="the shape --async-scheduling is measured on")
    ap.add_argument("--async-batches", default="256", help="batches of the --async-scheduling comparison")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU: checks the benchmark only")
    ap.add_argument("--quant-models", default="deepseek-v3-fp8,gpt-oss-120b-mxfp4,qwen3-30b-a3b-int4,mixtral-8x7b-fp8",
                    help="quantized MoE shapes (loadtest/benches/gpu_quant.py); '' skips them")
    ap.add_argument("--quant-batches", default="1,16,64,256")
    ap.add_argument("--quant-bf16-gb", type=float, default=24.0,
                    help="GB of bf16 expert stacks the bf16 comparison may build (whole layers, at least one)")
    output.add_args(ap)
    args = ap.parse_args(argv)
    args.device, args.dtype = ("cpu", torch.float32) if args.cpu_dry_run else ("cuda", torch.bfloat16)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.batches, args.eager_batches, args.hf_batches = ints(args.batches), ints(args.eager_batches), ints(args.hf_batches)
    args.async_batches = ints(args.async_batches)
    args.quant_batches = ints(args.quant_batches)
    if args.cpu_dry_run:  # the quantized kernels run under Triton's interpreter (read when triton is imported)
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        raise SystemExit("python -m loadtest gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    from transformers import AutoTokenizer

    from loadtest.checkpoints import save_tokenizer

    result = results.new_result("gpu", argv, {k: str(v) if isinstance(v, torch.dtype) else v
                                              for k, v in vars(args).items()},
                                heading=HEADING, section="gpu-dry-run" if args.cpu_dry_run else "gpu",
                                packages=("triton",))
    out = result["measurements"] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu dry run ({platform.machine()})",
        "peak_GBps": args.peak_gbps, "engines": [], "transformers": {}}
    out["copy_GBps"] = round(copy_bandwidth() / 1e9, 1) if args.device == "cuda" else None
    log(f"{out['device']}: copy {out['copy_GBps']} GB/s")
    models = [m for m in args.models.split(",") if m and m != "none"]
    tok_dir = Path("/tmp/moe-serve-bench-tokenizer")
    if models and not (tok_dir / "tokenizer.json").exists():
        save_tokenizer(tok_dir, 32000)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if models else None
    peak = args.peak_gbps * 1e9
    for shape in models:
        bench_shape(shape, args, tokenizer, peak, out)
        result["summary"]["blocks"] = report_blocks(out)
        results.write(result, args.json)  # what is measured so far survives a run cut short
    if args.quant_models:
        from loadtest.benches.gpu_quant import quant_moe

        out["quant_moe"] = quant_moe(args, peak, lambda: left(args), log)
        result["summary"]["blocks"] = report_blocks(out)
        results.write(result, args.json)
    out["seconds"] = round(time.monotonic() - T0, 1)
    output.finish(result, args)
    return result
