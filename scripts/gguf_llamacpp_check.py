"""GGUF import against llama.cpp's own tools (not part of the test suite: it needs the llama.cpp
tree and build of the benchmark peer, `loadtest/peers/llamacpp.py`, in ~/.cache/moe-serve/llama.cpp).

Tiny random checkpoints (the test families' shapes, the bundled tokenizer) are converted with
llama.cpp's convert_hf_to_gguf.py (F32; `--fuse-qkv` for Qwen3-MoE / OLMoE; gpt-oss from an MXFP4
checkpoint too) and quantized with llama-quantize; each file is loaded by models/gguf_loader.py
and compared with the safetensors checkpoint (F32: the largest logit difference) or with a float
model over the `gguf` package's dequantization of the file (quantized: whether the packed weights
equal it, the median relative logit error).

    .venv/bin/python scripts/gguf_llamacpp_check.py [--out /tmp/gguf-check]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loadtest.peers import llamacpp  # noqa: E402
from models import load_model  # noqa: E402
from tests.conftest import BUNDLED  # noqa: E402
from tests.models.conftest import make_checkpoint  # noqa: E402
from tests.models.simple_runner import prefill_logits  # noqa: E402
from tests.models.test_gguf import FAMILIES, PROMPTS, SIZES, float_reference, rel_err  # noqa: E402
from tests.models.test_quant import mxfp4_pack  # noqa: E402

K_SIZES = {**SIZES, "hidden_size": 256, "intermediate_size": 256, "num_local_experts": 4}  # K-quants: rows of 256


def checkpoint(out: Path, family: str, mxfp4: bool = False, **sizes) -> Path:
    d = out / f"hf-{family}{'-mxfp4' if mxfp4 else ''}{'-k' if sizes else ''}"
    if d.exists():
        return d
    extra = {"swiglu_limit": 7.0} if family == "gpt_oss" else {}
    make_checkpoint(family, d, seed=1, **{**SIZES, **FAMILIES.get(family, {}), **extra, **sizes})
    for f in os.listdir(BUNDLED):
        if "token" in f or f == "special_tokens_map.json":
            shutil.copy(BUNDLED / f, d / f)
    if mxfp4:  # gpt-oss's released layout: experts as _blocks / _scales
        t = load_file(str(d / "model.safetensors"))
        for name in [n for n in t if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            t[name + "_blocks"], t[name + "_scales"] = mxfp4_pack(t.pop(name).transpose(1, 2))
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def convert(hf: Path, out: Path, *extra: str) -> Path:
    if not out.exists():
        cmd = llamacpp.convert_command(hf, out, "f32") + list(extra)
        env = {**os.environ, "MOE_SERVE_GGUF_PRE": "gpt-2", **llamacpp.convert_env()}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"convert_hf_to_gguf failed:\n{r.stderr[-3000:]}")
    return out


def compare_float(name: str, gguf: Path, hf: Path) -> None:
    m, ref = load_model(str(gguf), progress=False), load_model(str(hf), progress=False, dtype="float32")
    diff = max(float((a - b).abs().max()) for a, b in zip(prefill_logits(m, PROMPTS), prefill_logits(ref, PROMPTS)))
    kept = sorted({q.fmt.value for q in m.qweights.values()})
    print(f"{name:34s} max |logit difference| vs safetensors {diff:.3g}" + (f"  (kept {kept})" if kept else ""))


def compare_quantized(name: str, gguf: Path, hf: Path, work: Path) -> None:
    m = load_model(str(gguf), progress=False)
    ref = float_reference(gguf, hf, work)
    rp = dict(ref.named_parameters())
    exact = [n for n, q in m.quantized.items() if torch.equal(q.dequantize(), rp[n].float())]
    errs = [rel_err(a[i], b[i]) for a, b in zip(prefill_logits(m, PROMPTS), prefill_logits(ref, PROMPTS))
            for i in range(a.shape[0])]
    fmts = sorted({q.fmt for q in m.quantized.values()}) + sorted({q.fmt.value for q in m.qweights.values()})
    print(f"{name:34s} held {fmts}; {len(exact)}/{len(m.quantized)} packed weights equal gguf's dequantization; "
          f"logits vs that float model: median rel. error {float(np.median(errs)):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/gguf-check")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    if not llamacpp.built():
        raise SystemExit("llama.cpp is not built: python -m loadtest llamacpp-build (the benchmark peer) first")
    quantize = llamacpp.binary("llama-quantize")
    for family in ("deepseek_v2", "deepseek_v3", "gpt_oss"):
        hf = checkpoint(out, family)
        compare_float(f"{family} F32", convert(hf, out / f"{family}-F32.gguf"), hf)
    for family in ("qwen3_moe", "olmoe"):
        hf = checkpoint(out, family)
        compare_float(f"{family} F32 --fuse-qkv", convert(hf, out / f"{family}-fused.gguf", "--fuse-qkv"), hf)
    hf = checkpoint(out, "gpt_oss", mxfp4=True)
    compare_float("gpt_oss MXFP4 checkpoint", convert(hf, out / "gpt_oss-mxfp4.gguf"), hf)
    jobs = [("mixtral", K_SIZES, ("Q8_0", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q6_K")),
            ("deepseek_v3", {}, ("Q8_0", "Q4_0")), ("gpt_oss", {}, ("Q8_0", "MXFP4_MOE"))]
    for family, sizes, types in jobs:
        hf = checkpoint(out, family, **sizes)
        f32 = convert(hf, out / f"{hf.name}-F32.gguf")
        for qt in types:
            path = out / f"{hf.name}-{qt}.gguf"
            if not path.exists():
                subprocess.run([str(quantize), str(f32), str(path), qt, "2"], check=True, capture_output=True)
            compare_quantized(f"{family} {qt}", path, hf, out / f"ref-{hf.name}-{qt}")


if __name__ == "__main__":
    main()
