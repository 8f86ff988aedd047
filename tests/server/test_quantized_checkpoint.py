"""A quantized checkpoint end to end: a real server loads an FP8-block copy of the bundled model
(DeepSeek's layout: float8_e4m3 weights and a float32 `weight_scale_inv` per 128x128 tile), keeps
its weights in that format, says so in /version's kernel plan and its startup log, and answers
(OpenAI SDK as the client)."""

from __future__ import annotations

import json
import shutil

import httpx
from safetensors.torch import load_file, save_file

from server.config import BUNDLED_MODEL
from tests.models.test_quant import fp8_tiles, quantizable
from tests.server.conftest import MAIN_ARGS, start_server


def test_server_keeps_fp8_block_weights(tmp_path):
    model_dir = tmp_path / "tiny-mixtral-fp8"
    shutil.copytree(BUNDLED_MODEL, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if quantizable(name, t):
            q, scale, _ = fp8_tiles(t.float(), 128, 128)
            out[name], out[name + "_scale_inv"] = q, scale
        else:
            out[name] = t
    save_file(out, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    server = start_server(["--model", str(model_dir), *MAIN_ARGS, "--device", "cpu"], tmp_path)
    try:
        plan = httpx.get(server.url + "/version", timeout=30).json()["kernel_plan"]
        assert all(g["weight_formats"] == {"attention": "fp8_block", "experts": "fp8_block", "shared": None}
                   for g in plan["layers"]), plan["layers"]
        assert plan["lm_head_format"] == "bf16" and plan["quantization"] is None
        fp8_bytes = sum(t.numel() * t.element_size() for n, t in out.items() if n.endswith("_scale_inv")
                        or t.dtype.itemsize == 1)
        assert 0 < plan["quantized_bytes"] <= 1.05 * fp8_bytes < plan["weight_bytes"]
        client = server.client()
        model = client.models.list().data[0].id
        first = client.completions.create(model=model, prompt="The list data type", max_tokens=8, temperature=0)
        again = client.completions.create(model=model, prompt="The list data type", max_tokens=8, temperature=0)
        assert first.choices[0].text and first.choices[0].text == again.choices[0].text
        assert "experts fp8_block" in server.logs()  # the startup kernel plan names the format
    finally:
        assert server.stop() == 0
