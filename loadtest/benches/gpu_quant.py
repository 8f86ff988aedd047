"""The quantized MoE kernels on the GPU (issue 27): `python -m loadtest gpu --quant-models ...`.

For each quantized model shape, the MoE layers' experts are built on the device from random codes
and scales in their QTensor format (no float weights are ever made), their resident bytes are read
from the allocator against the formats' own bytes, and the decode time of all the layers' experts
(`triton_qmoe.qmoe_triton`, one call per layer, random routing per layer, replayed from a CUDA graph
as the engine's decode does) is measured at each batch,
against the same shapes in bf16 through `triton_moe.fused_moe_triton` (bf16 stacks cut to the layers
that fit --quant-bf16-gb; its time is per layer, scaled to the model's layers). MBU: the bytes the
step must read (the distinct experts each layer's tokens were routed to, whole, scales included,
plus the activations) over the time, against the peak bandwidth.

Shapes (`QUANT_SHAPES`): DeepSeek-V3 (256 experts top-8, H 7168, I 2048, FP8 block 128x128, W8A8;
4 layers), gpt-oss-120b (128 experts top-4, H 2880, I 2880, MXFP4 with biases and the clamped SwiGLU;
all 36 layers), Qwen3-30B-A3B INT4 (128 experts top-8, H 2048, I 768, group 128, symmetric; 8 layers),
Mixtral-8x7B FP8 block (8 experts top-2, H 4096, I 14336, 128x128; 8 layers).
On the CPU (`--cpu-dry-run`) the same code runs under TRITON_INTERPRET=1 at toy sizes.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantShape:
    name: str
    fmt: str
    experts: int
    top_k: int
    hidden: int
    inter: int
    layers: int
    block: tuple[int, int] | None = None  # fp8_block
    group: int | None = None  # int4_group
    gptoss: bool = False  # biases + clamped SwiGLU

    def tiny(self) -> QuantShape:
        return QuantShape(self.name, self.fmt, 4, 2, 128, 64, 1, self.block, self.group and 64, self.gptoss)


QUANT_SHAPES = {
    "deepseek-v3-fp8": QuantShape("deepseek-v3-fp8", "fp8_block", 256, 8, 7168, 2048, 4, block=(128, 128)),
    "gpt-oss-120b-mxfp4": QuantShape("gpt-oss-120b-mxfp4", "mxfp4", 128, 4, 2880, 2880, 36, gptoss=True),
    "qwen3-30b-a3b-int4": QuantShape("qwen3-30b-a3b-int4", "int4_group", 128, 8, 2048, 768, 8, group=128),
    # issue 27's acceptance shape: FP8 block at batch 1 >= 1.6x the bf16 tok/s (half the bytes), MBU >= 50%
    "mixtral-8x7b-fp8": QuantShape("mixtral-8x7b-fp8", "fp8_block", 8, 2, 4096, 14336, 8, block=(128, 128)),
}


def random_qtensor(s: QuantShape, N: int, K: int, dev: str, g: torch.Generator):
    """A random [E, N, K] QTensor of the shape's format, built on `dev` from random codes."""
    from models.quant.formats import MX_GROUP, QTensor, WeightFormat

    E = s.experts
    if s.fmt == "fp8_block":
        assert s.block is not None
        bn, bk = s.block
        raw = torch.randint(0, 256, (E, N, K), dtype=torch.uint8, device=dev, generator=g)
        raw &= 0xBF  # exponent below the top: no NaN codes, |w| < 2
        scale = torch.rand(E, -(-N // bn), -(-K // bk), device=dev, generator=g) * (K**-0.5)
        return QTensor(WeightFormat.FP8_BLOCK, (E, N, K), raw.view(torch.float8_e4m3fn), scale, block=s.block)
    codes = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=dev, generator=g)
    if s.fmt == "mxfp4":
        scale = torch.randint(118, 124, (E, N, K // MX_GROUP), dtype=torch.uint8, device=dev, generator=g)
        return QTensor(WeightFormat.MXFP4, (E, N, K), codes, scale, group=MX_GROUP)
    assert s.fmt == "int4_group" and s.group
    scale = (torch.rand(E, N, K // s.group, device=dev, generator=g) * (K**-0.5) / 4).to(torch.bfloat16)
    return QTensor(WeightFormat.INT4_GROUP, (E, N, K), codes, scale, group=s.group)


def graphed(fn, dev: str, log):
    """(a callable replaying `fn` from a CUDA graph, True) on CUDA, as the engine's decode runs it (at
    batch 1 the Python launches of 36 layers would otherwise be timed, not the kernels); (fn, False)
    on the CPU or when the capture fails."""
    if dev != "cuda":
        return fn, False
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, True
    except Exception as e:  # noqa: BLE001 (timed eagerly instead, and said so)
        log(f"CUDA graph capture failed ({e!r:.200}): timing eagerly")
        torch.cuda.synchronize()
        return fn, False


def _allocated(dev: str) -> int:
    return torch.cuda.memory_allocated() if dev == "cuda" else 0


def _free(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def bench_quant_shape(s: QuantShape, batches: list[int], args, peak: float, left, log) -> dict:
    from loadtest.benches.gpu_models import median_ms
    from models.kernels.triton_moe import fused_moe_triton
    from models.kernels.triton_qmoe import fp8_dot_supported, qmoe_triton

    dev = args.device
    act = torch.bfloat16 if dev == "cuda" else torch.float32
    if args.cpu_dry_run:
        s = s.tiny()
    E, k, H, inter, L = s.experts, s.top_k, s.hidden, s.inter, s.layers
    res: dict = {"shape": s.name, "format": s.fmt, "experts": E, "top_k": k, "hidden": H, "inter": inter,
                 "layers": L, "rows": []}
    g = torch.Generator(device=dev).manual_seed(0)
    before = _allocated(dev)
    t = time.monotonic()
    layers = []
    for _ in range(L):
        w13, w2 = random_qtensor(s, 2 * inter, H, dev, g), random_qtensor(s, H, inter, dev, g)
        b13 = (torch.randn(E, 2 * inter, device=dev, generator=g) * 0.1).to(act) if s.gptoss else None
        b2 = (torch.randn(E, H, device=dev, generator=g) * 0.1).to(act) if s.gptoss else None
        layers.append((w13, w2, b13, b2))
    if dev == "cuda":
        torch.cuda.synchronize()
    fmt_bytes = sum(w13.nbytes + w2.nbytes + sum(b.numel() * b.element_size() for b in (b13, b2) if b is not None)
                    for w13, w2, b13, b2 in layers)
    res["build_seconds"] = round(time.monotonic() - t, 1)
    res["format_bytes"] = fmt_bytes
    res["resident_bytes"] = _allocated(dev) - before if dev == "cuda" else fmt_bytes
    res["resident_over_format"] = round(res["resident_bytes"] / fmt_bytes, 4)
    res["bf16_bytes_same_shapes"] = L * E * 3 * H * inter * 2
    res["w8a8"] = s.fmt.startswith("fp8") and fp8_dot_supported(torch.device(dev))
    expert_bytes = (layers[0][0].nbytes + layers[0][1].nbytes) / E  # one expert's w13 + w2 with scales
    bias_bytes = (2 * inter + H) * (2 if s.gptoss else 0)
    log(f"quant {s.name}: {L} layers built in {res['build_seconds']}s, resident {res['resident_bytes'] / 1e9:.2f} GB "
        f"for {fmt_bytes / 1e9:.2f} GB of {s.fmt} (bf16 would be {res['bf16_bytes_same_shapes'] / 1e9:.2f} GB)")
    extra = dict(limit=7.0) if s.gptoss else {}
    routes: dict[int, list] = {}
    for T in batches:
        gen = torch.Generator(device=dev).manual_seed(T)
        x = torch.randn(T, H, device=dev, generator=gen).to(act)
        rl = []
        for _ in range(L):
            w, ids = torch.softmax(torch.randn(T, E, device=dev, generator=gen), -1).topk(k, -1)
            rl.append((ids, w))
        routes[T] = [x, rl]
        distinct = sum(int(torch.unique(ids).numel()) for ids, _ in rl)
        step_bytes = distinct * (expert_bytes + bias_bytes) + L * 2 * T * H * x.element_size()

        def run(x=x, rl=rl):
            for (w13, w2, b13, b2), (ids, w) in zip(layers, rl):
                qmoe_triton(x, w13, w2, ids, w, b13=b13, b2=b2, **extra)

        if left() < 10:
            res.setdefault("skipped", []).append(f"batch {T}: time budget")
            continue
        timed, graph = graphed(run, dev, log)
        ms = median_ms(timed, dev)
        row = {"batch": T, "format": s.fmt, "cuda_graph": graph, "ms_all_layers": round(ms, 4), "ms_per_layer": round(ms / L, 4),
               "moe_tok_per_s": round(T / (ms / 1e3), 1), "bytes_per_step": int(step_bytes),
               "achieved_GBps": round(step_bytes / (ms / 1e3) / 1e9, 1),
               "mbu": round(step_bytes / (ms / 1e3) / peak, 4)}
        res["rows"].append(row)
        log(f"quant {s.name} B={T}: {ms:.3f} ms for {L} layers ({row['moe_tok_per_s']} tok/s, "
            f"{row['achieved_GBps']} GB/s, MBU {row['mbu']})")
    layers.clear()
    _free(dev)
    # the same shapes in bf16 through the float Triton kernel, as many layers as fit the budget
    per_layer = E * 3 * H * inter * 2
    L16 = max(1, min(L, int(args.quant_bf16_gb * 1e9 // per_layer)))
    res["bf16_layers_measured"] = L16
    bl = []
    for _ in range(L16):
        w13 = torch.randn(E, 2 * inter, H + (1 if s.gptoss else 0), device=dev, dtype=act, generator=g).mul_(H**-0.5)
        w2 = torch.randn(E, H, inter + (1 if s.gptoss else 0), device=dev, dtype=act, generator=g).mul_(inter**-0.5)
        bl.append((w13, w2))
    for T in batches:
        if T not in routes or left() < 10:
            continue
        x, rl = routes[T]

        def run16(x=x, rl=rl):
            for (w13, w2), (ids, w) in zip(bl, rl):
                fused_moe_triton(x, w13, w2, ids, w, bias=s.gptoss, **extra)

        timed, graph = graphed(run16, dev, log)
        ms = median_ms(timed, dev)
        del timed
        distinct = sum(int(torch.unique(ids).numel()) for ids, _ in rl[:L16])
        b16 = distinct * (3 * H * inter * 2 + bias_bytes) + L16 * 2 * T * H * x.element_size()
        row = next(r for r in res["rows"] if r["batch"] == T)
        ms_all = ms / L16 * L
        row.update(bf16_cuda_graph=graph, bf16_ms_per_layer=round(ms / L16, 4), bf16_moe_tok_per_s=round(T / (ms_all / 1e3), 1),
                   bf16_mbu=round(b16 / (ms / 1e3) / peak, 4),
                   speedup_vs_bf16=round((ms / L16) / row["ms_per_layer"], 3))
        log(f"bf16 {s.name} B={T}: {ms / L16:.3f} ms per layer; {s.fmt} is {row['speedup_vs_bf16']}x")
    bl.clear()
    routes.clear()
    _free(dev)
    return res


def quant_moe(args, peak: float, left, log) -> list[dict]:
    out = []
    for name in [m for m in args.quant_models.split(",") if m]:
        if name not in QUANT_SHAPES:
            raise SystemExit(f"--quant-models: unknown shape {name!r} (known: {', '.join(QUANT_SHAPES)})")
        if left() < 20:
            out.append({"shape": name, "skipped": "time budget"})
            continue
        try:
            out.append(bench_quant_shape(QUANT_SHAPES[name], args.quant_batches, args, peak, left, log))
        except Exception as e:  # noqa: BLE001 (reported; the other shapes still run)
            import traceback

            traceback.print_exc()
            out.append({"shape": name, "error": repr(e)[:800]})
            log(f"quant {name} FAILED: {e!r}")
            _free(args.device)
    return out
