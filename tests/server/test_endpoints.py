"""Every endpoint and parameter, through the official openai client and raw httpx, against the
real server process."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


# -- health, models, version, metrics ---------------------------------------------------------
def test_health_ready_version(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    r = http.get("/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    v = http.get("/version").json()
    assert isinstance(v["version"], str) and v["engine"] == "native"
    plan = v["kernel_plan"]  # the native engine's kernels, as resolved at load (models/kernels/plan.py)
    assert plan["device"] == "cpu" and plan["layers"] and plan["cuda_graphs"] is False
    if plan["capabilities"]["cpu_kernels"]:  # the bundled checkpoint is bf16: --dtype auto keeps its weights so
        assert plan["quantization"] == "bf16" and plan["weights"] == "bf16 (fp32 math)" and plan["dtype"] == "float32"
        assert 0 < plan["quantized_bytes"] < plan["weight_bytes"]
    assert {group["attention"] for group in plan["layers"]} <= {"cpu", "reference"}


def test_models(client: openai.OpenAI, http: httpx.Client, model_name: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "moe-serve" and isinstance(card.created, int)
    assert client.models.retrieve(model_name).id == model_name
    r = http.get("/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_metrics_endpoint(http: httpx.Client) -> None:
    assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:prompt_tokens_total",
                 "moe_http_requests_total"):
        assert name in r.text, name
    assert 'route="/v1/completions"' in r.text


def test_openapi_document(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "ChatCompletionRequest" in doc["components"]["schemas"]


# -- completions --------------------------------------------------------------------------------
def test_completion_basic(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, seed=1)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model_name
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_max_tokens_length(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_completion_prompt_shapes(client: openai.OpenAI, model_name: str, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    # list of strings: one choice per prompt, n choices each
    r = client.completions.create(model=model_name, prompt=[PROMPT, "Hello"], max_tokens=3, n=2, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    # token ids and list of token-id lists
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=3, temperature=0)
    by_text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=model_name, prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert len(r.choices) == 2
    assert r.usage.prompt_tokens == len(ids) + 2


def test_completion_echo_and_logprobs(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=3, echo=True, logprobs=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])  # top-2 plus the sampled token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # greedy: the sampled token is the most likely one
    for val, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:], strict=True):
        assert val == pytest.approx(max(top.values()), abs=1e-4)


def test_completion_logprobs_up_to_20(client: openai.OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2, logprobs=20)
    assert all(len(t) >= 20 for t in r.choices[0].logprobs.top_logprobs)


def test_completion_stop_string(client: openai.OpenAI, model_name: str) -> None:
    free = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(free.strip()) >= 2, f"12 greedy tokens of the bundled model gave {free!r}"
    stop = free.strip()[:2]
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text and free.startswith(r.choices[0].text)
    kept = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text.endswith(stop)


def test_completion_seed_reproducible(client: openai.OpenAI, model_name: str) -> None:
    a = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, seed=1234, temperature=1.0)
    b = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, seed=1234, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text


def test_completion_vllm_extras(client: openai.OpenAI, model_name: str, http: httpx.Client) -> None:
    r = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, best_of=1, n=1, user="tester",
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100},
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "stop_token_ids": [1], "ignore_eos": False, "skip_special_tokens": True,
                    "include_stop_str_in_output": False, "prompt_logprobs": 1, "priority": 0,
                    "return_routing": True})
    c = r.choices[0]
    assert r.usage.completion_tokens >= 2
    extra = c.model_extra or {}
    assert "prompt_logprobs" in extra and len(extra["prompt_logprobs"]) == r.usage.prompt_tokens
    assert extra["prompt_logprobs"][0] is None
    assert_routing_shape(extra["routing"], r.usage.completion_tokens - 1)
    assert_routing_shape(extra["prompt_routing"], r.usage.prompt_tokens)


def assert_routing_shape(routing: list, num_tokens: int, layers: int = 4, top_k: int = 2, experts: int = 8) -> None:
    """The bundled model: 4 MoE layers, 8 experts, top-2; one entry per routed token."""
    assert len(routing) == num_tokens, (len(routing), num_tokens)
    for token in routing:
        assert len(token) == layers
        for chosen in token:
            assert len(chosen) == top_k == len(set(chosen)) and all(0 <= e < experts for e in chosen)


def test_completion_max_tokens_null_uses_rest_of_context(http: httpx.Client, max_model_len: int) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": None, "temperature": 0,
                                           "ignore_eos": True})
    assert r.status_code == 200
    u = r.json()["usage"]
    assert u["total_tokens"] == max_model_len and r.json()["choices"][0]["finish_reason"] == "length"


# -- chat ---------------------------------------------------------------------------------------
def test_chat_basic(client: openai.OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=5, seed=7)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model_name
    (c,) = r.choices
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length") and c.logprobs is None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_prompt_is_the_chat_template(client: openai.OpenAI, model_name: str, http: httpx.Client) -> None:
    tok = http.post("/tokenize", json={"messages": CHAT}).json()
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=1)
    assert r.usage.prompt_tokens == tok["count"]


def test_chat_content_parts_and_roles(client: openai.OpenAI, model_name: str, http: httpx.Client) -> None:
    parts = [{"role": "developer", "content": "Be terse."},
             {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]},
             {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Again.", "name": "bob"}]
    r = client.chat.completions.create(model=model_name, messages=parts, max_tokens=2)
    assert r.choices[0].message.role == "assistant"


def test_chat_logprobs(client: openai.OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=3, logprobs=True,
                                       top_logprobs=3, temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    text_bytes = b"".join(bytes(e.bytes) for e in content)
    assert text_bytes.decode("utf-8", errors="replace") == r.choices[0].message.content
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


def test_chat_n_stop_seed_max_completion_tokens(client: openai.OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(model=model_name, messages=CHAT, n=3, max_completion_tokens=4,
                                       seed=11, stop=["\n\n"])
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens <= 12
    a = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6, seed=5)
    b = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_max_tokens_default_is_rest_of_context(http: httpx.Client, max_model_len: int) -> None:
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["total_tokens"] == max_model_len


def test_chat_response_format_text_and_tool_choice_none(client: openai.OpenAI, model_name: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=2,
                                       response_format={"type": "text"}, tools=tools, tool_choice="none")
    assert r.choices[0].message.content is not None


def test_chat_return_routing(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "return_routing": True,
                                                "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert_routing_shape(body["choices"][0]["routing"], 2)  # the last generated token is never routed
    assert_routing_shape(body["prompt_routing"], body["usage"]["prompt_tokens"])


def test_model_may_be_omitted(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200


# -- tokenize / detokenize ----------------------------------------------------------------------
def test_tokenize_detokenize(http: httpx.Client, max_model_len: int, model_name: str) -> None:
    r = http.post("/tokenize", json={"model": model_name, "prompt": PROMPT}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == max_model_len
    back = http.post("/detokenize", json={"model": model_name, "tokens": r["tokens"]}).json()
    assert PROMPT in back["prompt"]
    raw = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert http.post("/detokenize", json={"tokens": raw["tokens"]}).json() == {"prompt": PROMPT}
    strs = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert len(strs["token_strs"]) == strs["count"]
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    no_gen = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert chat["count"] > no_gen["count"] > 0


def test_unicode_roundtrip(client: openai.OpenAI, model_name: str, http: httpx.Client) -> None:
    text = "héllo wörld — 你好 😀"
    ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == text
    r = client.completions.create(model=model_name, prompt=text, max_tokens=3, echo=True)
    assert r.choices[0].text.startswith(text)


def test_request_id_header_and_json(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert r.headers["x-request-id"] == r.json()["id"]
    assert json.loads(r.text)["object"] == "text_completion"


def test_usage_carries_moe_summary(server, model_name) -> None:
    """usage.moe: distinct experts per layer, routing entropy, device shares; same when streamed."""
    import math

    body = {"model": model_name, "prompt": "The list data type", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        moe = r.json()["usage"]["moe"]
        lines = [ln for ln in c.post("/v1/completions", json={**body, "stream": True,
                                                                "stream_options": {"include_usage": True}}
                                      ).text.splitlines() if ln.startswith("data: {")]
    layers = len(moe["distinct_experts_per_layer"])
    assert layers >= 1
    assert all(1 <= d <= 8 for d in moe["distinct_experts_per_layer"])  # bundled model: 8 experts
    usage = r.json()["usage"]
    # every token that ran through the model (prompt + all generated but the last) x layers x top-2
    assert moe["expert_assignments"] == (usage["total_tokens"] - 1) * layers * 2
    assert 0 < moe["routing_entropy_bits"] <= moe["max_routing_entropy_bits"] == math.log2(8)
    assert abs(sum(moe["device_share"].values()) - 1.0) < 1e-3
    streamed = json.loads(lines[-1][len("data: "):])["usage"]["moe"]
    assert streamed == moe
