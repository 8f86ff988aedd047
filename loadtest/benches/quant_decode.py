"""CPU decode step by weight format: float32 vs --quantization int8 / int4 (and others), same run.

    python -m loadtest quant-decode [--formats float32,int8,int4] [--batches 1,16] [--rounds 10]
        [--shape mixtral-140m]

Formats: float32, bfloat16 (--dtype bfloat16: bf16 compute), bf16 (a bf16 copy of the checkpoint
served with --dtype auto: bf16 weights, float32 math in the C kernels), and the --quantization
formats (int8, int8_channel, int4, int4_zp).

One offline engine per (format, batch) on the benchmark checkpoint (loadtest/checkpoints.py,
random weights), each with `batch` requests of 128 random tokens prefilled; then decode steps,
the engines interleaved step by step (loadtest/harness.py) so that background load on a shared
machine hits them alike. Reported: median and best step wall time per format and batch, tokens/s
(batch / median step) and the weight bytes the format keeps (float32: every parameter; a
quantized format: its quantized weights plus the float32 parameters it leaves, embedding, norms
and router), and the packed float32 copies the kernel plan makes beside them.
"""

from __future__ import annotations

import argparse
import random

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### Decode step by weight format (CPU, quantized weights)"
BF16_HEADING = "### bf16 weights with float32 math (CPU decode step)"  # runs with the bf16 format
PROMPT_LEN = 128


def bf16_copy(path: str) -> str:
    """A bf16 copy of checkpoint `path` beside it (`<path>-bf16`: the weights rounded to bf16, the
    config's dtype bfloat16), made once."""
    import json
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(path), Path(f"{path}-bf16")
    if (dst / "model.safetensors").exists():
        return str(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return str(dst)


def engine(model: str, fmt: str, batch: int, steps: int):
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    quant = None if fmt in ("float32", "bfloat16", "bf16") else fmt
    if fmt == "bf16":  # --dtype auto on a bf16 checkpoint: bf16 weights, float32 math
        llm = LLM(bf16_copy(model), dtype="auto", max_num_seqs=batch, max_num_batched_tokens=2048,
                  max_model_len=PROMPT_LEN + 16 + 2 * steps)
        if llm.core.model.kernel_plan.quantization != "bf16":
            raise SystemExit("bf16: --dtype auto did not keep the weights in bf16 here (C kernels not built?)")
    else:
        llm = LLM(model, dtype="float32" if quant else fmt, quantization=quant, max_num_seqs=batch,
                  max_num_batched_tokens=2048, max_model_len=PROMPT_LEN + 16 + 2 * steps)
    core = llm.core
    rng = random.Random(0)
    for i in range(batch):
        core.add_request(EngineRequest(f"r{i}", [rng.randrange(3, 30000) for _ in range(PROMPT_LEN)],
                                       SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)))
    while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
        core.step()
    return core


def weight_bytes(model) -> int:
    floats = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    return floats + sum(q.nbytes for q in model.quantized.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest quant-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="float32,int8,int4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per engine")
    ap.add_argument("--shape", default="mixtral-140m", help="benchmark checkpoint (loadtest/checkpoints.py)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from loadtest.checkpoints import make_checkpoint

    model = make_checkpoint(args.shape)
    formats = [f for f in args.formats.split(",") if f]
    batches = [int(b) for b in args.batches.split(",") if b]
    cores = {(f, b): engine(model, f, b, args.rounds + 4) for f in formats for b in batches}
    bf16 = "bf16" in formats  # its own docs section: the bf16 weights of --dtype auto
    result = results.new_result("quant-decode", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=BF16_HEADING if bf16 else HEADING,
                                section="quant-decode-bf16" if bf16 else None, packages=("torch",))
    timed = interleave({f"{f}/{b}": c.step for (f, b), c in cores.items()}, rounds=args.rounds, warmup=1)
    rows = []
    for (f, b), core in cores.items():
        s = timed[f"{f}/{b}"].summary()
        wb = weight_bytes(core.model)
        result["measurements"][f"{f}/{b}"] = {"format": f, "batch": b, "summary": s, "weight_bytes": wb,
                                              "kernel_plan": core.model.kernel_plan.to_dict()}
        rows.append([f, b, s["wall_median_s"] * 1e3, s["wall_best_s"] * 1e3, b / s["wall_median_s"], wb / 2**20,
                     core.model.kernel_plan.packed_bytes / 2**20])
        print(f"{f} batch {b}: median step {s['wall_median_s'] * 1e3:.1f} ms", flush=True)
    col = results.column
    result["summary"]["blocks"] = [
        results.text(f"The {args.shape} benchmark checkpoint, decode steps (context ~{PROMPT_LEN} tokens) of one engine "
                     f"per weight format and batch, interleaved step by step, {args.rounds} timed steps each, "
                     f"{torch.get_num_threads()} threads."),
        results.table(None, [col("weights"), col("batch", "d"), col("step ms median", ".1f"), col("best", ".1f"),
                             col("tokens/s", ".1f"), col("weight MiB", ".0f"), col("packed copies MiB", ".0f")],
                      rows),
    ]
    output.finish(result, args)
    return 0
