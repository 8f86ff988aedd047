"""FP8 weights on the CPU: the C fp8 kernels vs the torch reference vs float32, same run; memory.

    python -m loadtest fp8-cpu [--rounds 10] [--steps 6] [--shape mixtral-140m]

The benchmark checkpoint (loadtest/checkpoints.py, random weights) is written once more as a
DeepSeek-style FP8 checkpoint (`quant_method: fp8`, e4m3 weights with float32 `weight_scale_inv`
per 128x128 block for the attention and expert projections; embedding, LM head, norms and router
as they are), under the benchmark cache. Then, interleaved call by call (loadtest/harness.py):

1. kernels (one thread by default: per-core speed), at a decode-sized (1 row) and a batch-16 shape: a 2048 x 2048 linear and the
   checkpoint's experts layer (8 experts of 512 x 1024, top-2): the C fp8 kernels
   (`fp8_linear_cpu`, `fp8_moe_cpu`), the torch reference of models.quant.ops (dequantize, then
   the float32 matmuls) and float32 weights in the C float32 kernels (`linear_cpu`,
   `moe_experts_cpu` over their packed copies: the float32 model's path);
2. decode steps of the engine (context ~128 tokens) at batch 1 and 16: the float32 checkpoint,
   the FP8 checkpoint on the C kernels, the FP8 checkpoint on the torch reference (its plan
   re-resolved with the C fp8 paths off: `cpu=False` on its kept weights);
3. memory: each checkpoint loaded in a fresh process: resident set growth over the load
   (VmRSS after - before, after malloc_trim), the engine's resident weight bytes
   (`MoEForCausalLM.weight_bytes`) and the checkpoint's file bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### FP8 weights on the CPU (C kernels vs the torch reference)"
PROMPT_LEN = 128
BLOCK = 128


def fp8_checkpoint(src: str) -> str:
    """`src` (a float checkpoint) as a DeepSeek-style FP8 checkpoint beside it (cached)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst = Path(src).parent / (Path(src).name + "-fp8")
    if (dst / "model.safetensors").exists():
        return str(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in load_file(str(Path(src) / "model.safetensors")).items():
        quantize = (t.dim() == 2 and name.endswith(".weight") and (".self_attn." in name or ".experts." in name))
        if not quantize:
            out[name] = t
            continue
        w = t.float()
        N, K = w.shape
        nb, kb = -(-N // BLOCK), -(-K // BLOCK)
        tiles = torch.nn.functional.pad(w, (0, kb * BLOCK - K, 0, nb * BLOCK - N)).reshape(nb, BLOCK, kb, BLOCK)
        scale = (tiles.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
        full = scale.repeat_interleave(BLOCK, 0)[:N].repeat_interleave(BLOCK, 1)[:, :K]
        out[name] = (w / full).to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK, BLOCK]}
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in Path(src).iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    return str(dst)


def kernel_variants(rows: int):
    """{name: fn} for the linear and the experts layer at `rows` rows (tokens)."""
    import torch

    from models.kernels import cpu_ops
    from models.quant import ops as qops
    from models.quant.formats import QTensor, WeightFormat

    cpu_ops.load()
    g = torch.Generator().manual_seed(0)

    def fp8(w: torch.Tensor) -> QTensor:
        *lead, N, K = w.shape
        s = (w.reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK).abs().amax(dim=(-3, -1)) / 448).clamp(min=1e-12)
        full = s.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)
        return QTensor(WeightFormat.FP8_BLOCK, tuple(w.shape), (w / full).to(torch.float8_e4m3fn), s, block=(BLOCK, BLOCK))

    ops = torch.ops.moe_serve
    lin = fp8(torch.randn(2048, 2048, generator=g) * 0.02)
    lin_f32 = lin.dequant()
    lin_packed = ops.linear_pack_cpu(lin_f32)
    x = torch.randn(rows, 2048, generator=g)
    E, H, inter, k = 8, 512, 1024, 2
    w13, w2 = fp8(torch.randn(E, 2 * inter, H, generator=g) * 0.02), fp8(torch.randn(E, H, inter, generator=g) * 0.02)
    p13, p2 = ops.moe_pack_cpu(w13.dequant(), w2.dequant())
    xe = torch.randn(rows, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)])
    tw = torch.softmax(torch.randn(rows, k, generator=g), dim=-1)
    return {
        "linear 2048x2048 / fp8 C": lambda: qops.qlinear_cpu(x, lin),
        "linear 2048x2048 / fp8 torch reference": lambda: qops.qlinear_reference(x, lin),
        "linear 2048x2048 / float32 C": lambda: ops.linear_cpu(x, lin_packed, None),
        "experts 8x512x1024 top-2 / fp8 C": lambda: qops.qmoe_cpu(xe, w13, w2, ids, tw),
        "experts 8x512x1024 top-2 / fp8 torch reference": lambda: qops.qmoe_reference(xe, w13, w2, ids, tw),
        "experts 8x512x1024 top-2 / float32 C": lambda: ops.moe_experts_cpu(xe, ids, tw, p13, p2),
    }


def engine(model: str, batch: int, steps: int, reference: bool = False):
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    llm = LLM(model, dtype="float32", max_num_seqs=batch, max_num_batched_tokens=2048,
              max_model_len=PROMPT_LEN + 16 + 2 * steps)
    core = llm.core
    if reference:  # the kept fp8 weights on the torch reference of models.quant.ops
        from models.kernels.packed import QTensorExperts, QTensorLinear

        for module in core.model.modules():
            for v in list(vars(module).values()):
                for h in v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(h, (QTensorLinear, QTensorExperts)):
                        h.cpu = False
            if hasattr(module, "kv_b_cpu"):
                module.kv_b_cpu = False
    rng = random.Random(0)
    for i in range(batch):
        core.add_request(EngineRequest(f"r{i}", [rng.randrange(3, 30000) for _ in range(PROMPT_LEN)],
                                       SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)))
    while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
        core.step()
    return core


MEMORY_PROBE = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import torch
from models import load_model
from models.kernels import cpu_ops
cpu_ops.load()
before = rss()
model = load_model(sys.argv[1], dtype="float32", device="cpu", progress=False)
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # the heap the load freed goes back: what stays is the model's
after = rss()
print(json.dumps({"rss_growth": after - before, "weights": model.weight_bytes(),
                  "formats": sorted(set(model.weight_formats().values()))}))
"""


def memory(path: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, path], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["file_bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest fp8-cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="timed calls per kernel variant")
    ap.add_argument("--steps", type=int, default=6, help="timed decode steps per engine")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--kernel-threads", type=int, default=1,
                    help="threads of the kernel timings (1: per-core speed, unaffected by a preempted thread)")
    ap.add_argument("--shape", default="mixtral-140m", help="benchmark checkpoint (loadtest/checkpoints.py)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from loadtest.checkpoints import make_checkpoint
    from models.kernels import cpu_ops
    from models.kernels import quant as Q

    if cpu_ops.load() is None:
        raise SystemExit("the C kernels are not available here")
    src = make_checkpoint(args.shape)
    fp8 = fp8_checkpoint(src)
    batches = [int(b) for b in args.batches.split(",") if b]
    result = results.new_result("fp8-cpu", argv, vars(args) | {"threads": torch.get_num_threads(),
                                                               "isa": Q.isa()[0]},
                                heading=HEADING, packages=("torch",))
    col = results.column
    krows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.kernel_threads)
    for rows in batches:
        timed = interleave(kernel_variants(rows), rounds=args.rounds, warmup=2)
        for name, samples in timed.items():
            s = samples.summary()
            result["measurements"][f"kernel {name} / {rows}"] = {"rows": rows, "summary": s}
            krows.append([name, rows, s["wall_median_s"] * 1e3, s["wall_best_s"] * 1e3])
            print(f"{name} rows {rows}: {s['wall_median_s'] * 1e3:.3f} ms", flush=True)
    torch.set_num_threads(threads)
    cores = {}
    for b in batches:
        cores[f"float32/{b}"] = engine(src, b, args.steps + 2)
        cores[f"fp8 C/{b}"] = engine(fp8, b, args.steps + 2)
        cores[f"fp8 torch reference/{b}"] = engine(fp8, b, args.steps + 2, reference=True)
    timed = interleave({n: c.step for n, c in cores.items()}, rounds=args.steps, warmup=1)
    erows = []
    for name, core in cores.items():
        s = timed[name].summary()
        weights, b = core.model.weight_bytes()["total"], int(name.rsplit("/", 1)[1])
        result["measurements"][f"engine {name}"] = {"batch": b, "summary": s, "weight_bytes": weights,
                                                    "kernel_plan": core.model.kernel_plan.to_dict()}
        erows.append([name.rsplit("/", 1)[0], b, s["wall_median_s"] * 1e3, s["wall_best_s"] * 1e3,
                      b / s["wall_median_s"], weights / 2**20])
        print(f"engine {name}: median step {s['wall_median_s'] * 1e3:.1f} ms", flush=True)
    del cores
    mrows = []
    for name, path in (("float32", src), ("fp8 (128x128 blocks)", fp8)):
        m = memory(path)
        result["measurements"][f"memory {name}"] = m
        mrows.append([name, m["file_bytes"] / 2**20, m["weights"]["total"] / 2**20,
                      m["weights"]["total"] / m["file_bytes"], m["rss_growth"] / 2**20,
                      (m["rss_growth"] - m["weights"]["total"]) / 2**20])
    result["summary"]["blocks"] = [
        results.text(f"The {args.shape} benchmark checkpoint and its FP8 copy (e4m3, float32 scales per 128x128 "
                     f"block on the attention and expert projections), {torch.get_num_threads()} threads, "
                     f"kernel level {Q.isa()[0]}. Kernels: {args.rounds} timed calls each, interleaved, "
                     f"{args.kernel_threads} thread(s)."),
        results.table("Kernels (ms per call)", [col("kernel / weights"), col("rows", "d"), col("median ms", ".3f"),
                                                col("best ms", ".3f")], krows),
        results.table(f"Engine decode steps (context ~{PROMPT_LEN} tokens, {args.steps} timed steps each)",
                      [col("weights / path"), col("batch", "d"), col("step ms median", ".1f"), col("best", ".1f"),
                       col("tokens/s", ".1f"), col("resident weight MiB", ".0f")], erows),
        results.table("Memory after load (a fresh process each)",
                      [col("checkpoint"), col("file MiB", ".0f"), col("resident weights MiB", ".0f"),
                       col("weights / file", ".2f"), col("RSS growth MiB", ".0f"),
                       col("RSS growth - weights MiB", ".0f")], mrows),
    ]
    output.finish(result, args)
    return 0
