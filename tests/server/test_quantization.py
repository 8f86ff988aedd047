"""`--quantization` end to end: a real server quantizes the bundled model at load, says so in
/version's kernel plan, and answers with the quantized kernels (OpenAI SDK as the client)."""

from __future__ import annotations

import httpx

from tests.server.conftest import MAIN_ARGS, start_server


def test_server_runs_int4_weights(tmp_path):
    server = start_server([*MAIN_ARGS, "--device", "cpu", "--quantization", "int4"], tmp_path)
    try:
        plan = httpx.get(server.url + "/version", timeout=30).json()["kernel_plan"]
        assert plan["quantization"] == "int4" and plan["quantized_bytes"] > 0
        assert plan["lm_head"] == "quantized" and all(g["quantization"] == "int4" for g in plan["layers"])
        client = server.client()
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="The list data type", max_tokens=8, temperature=0)
        again = client.completions.create(model=model, prompt="The list data type", max_tokens=8, temperature=0)
        assert out.choices[0].text and out.choices[0].text == again.choices[0].text
        assert "weights: int4" in server.logs()  # the startup kernel plan names the format
    finally:
        assert server.stop() == 0
