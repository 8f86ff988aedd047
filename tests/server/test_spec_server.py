"""A real server with --speculative-config: the same greedy text as plain decoding, over HTTP with the
OpenAI SDK, streaming and structured outputs included; the spec-decode series on /metrics; a bad config
stops the server at startup with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.config import BUNDLED_MODEL
from tests.server.conftest import MAIN_ARGS, MODEL, ROOT, start_server

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
PROMPT = ("Repeat the text.\nText: The for statement in Python differs a bit from what you may be used to in C.\n"
          "Repeat: The for statement in Python differs a bit from what you may be used to in C.\n"
          "Repeat: The for statement")


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    s = start_server(MAIN_ARGS + ["--dtype", "float32", "--speculative-config", SPEC],
                     tmp_path_factory.mktemp("spec-server"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


@pytest.mark.skipif(MODEL is not None, reason="compares with the bundled checkpoint offline")
def test_speculative_server_answers_as_plain_decoding(spec_server):
    from server.engine import LLM
    from server.engine.request import SamplingParams

    client = spec_server.client()
    model = client.models.list().data[0].id
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=32, temperature=0)
    llm = LLM(BUNDLED_MODEL, dtype="float32", num_kv_blocks=64)
    want = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    assert got.choices[0].text == want.outputs[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=32, temperature=0, stream=True) if c.choices)
    assert streamed == want.outputs[0].text
    assert spec_server.metric("vllm:spec_decode_num_drafts_total") > 0
    accepted = spec_server.metric("vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= spec_server.metric("vllm:spec_decode_num_draft_tokens_total")
    assert spec_server.metric("moe_decode_steps_total") is not None


def test_structured_output_with_speculation(spec_server):
    client = spec_server.client()
    model = client.models.list().data[0].id
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": 'Say {"name": "for"} {"name": "for"}'}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["name"], str)


def test_bad_speculative_config_stops_the_server_with_the_reason():
    r = subprocess.run([sys.executable, "-m", "server.cli", "--speculative-config",
                        '{"method": "ngram", "num_speculative_tokens": 99}'],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0
    assert "num_speculative_tokens must be an integer in 1..16" in r.stderr


def test_version_reports_the_kv_cache(spec_server):
    import httpx

    kv = httpx.get(spec_server.url + "/version", timeout=10).json()["kv_cache"]
    assert kv["blocks"] > 0 and kv["target_bytes"] > 0
    assert kv["draft_bytes"] == 0  # n-gram drafts keep no KV of their own
