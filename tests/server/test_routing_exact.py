"""Routing counters and per-request routing equal what the model itself chooses."""

from __future__ import annotations

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from models import load_model
from tests.models.simple_runner import greedy_generate, prefill_logits
from models.layers.moe import RoutingCapture
from server.config import BUNDLED_MODEL


def expert_counters(http: httpx.Client) -> dict[tuple[int, int], float]:
    out = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if s.name == "moe_expert_tokens_total":
                out[(int(s.labels["layer"]), int(s.labels["expert"]))] = s.value
    return out


def test_routing_counters_and_per_request_routing_match_the_model(server, http, model_name):
    prompt = [0, 205, 311, 1203, 87, 64, 999, 12, 430, 77, 2900, 15]
    before = expert_counters(http)
    r = http.post("/v1/completions", json={"model": model_name, "prompt": prompt, "max_tokens": 6,
                                            "temperature": 0, "ignore_eos": True, "return_routing": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    after = expert_counters(http)

    # the model, offline, on the same tokens: prompt + every generated token but the last
    # (the last one is sampled, never run through the model)
    model = load_model(BUNDLED_MODEL, dtype="float32", device="cpu", progress=False)
    out_ids = greedy_generate(model, [prompt], 6)[0]
    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    assert tok.decode(out_ids, skip_special_tokens=True) == choice["text"]  # the same greedy tokens
    generated = choice["routing"]
    assert len(choice["prompt_routing"]) == len(prompt) and len(generated) == 5
    capture = RoutingCapture()
    prefill_logits(model, [prompt + out_ids[:5]], capture)
    ids = capture.stacked_ids()  # [tokens, moe layers, top_k]
    assert ids.shape[0] == len(prompt) + len(generated)
    ours = [[sorted(layer) for layer in t] for t in choice["prompt_routing"] + generated]  # [token][layer]
    ref = [[sorted(layer) for layer in t] for t in ids.tolist()]
    assert ours == ref

    # the Prometheus counters moved by exactly these token-expert assignments
    L, E = ids.shape[1], model.config.num_experts
    counts = torch.zeros(L, E, dtype=torch.long)
    for layer in range(L):
        counts[layer] = torch.bincount(ids[:, layer].reshape(-1), minlength=E)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert {k: int(v) for k, v in delta.items() if v} == {
        (layer, e): int(counts[layer, e]) for layer in range(L) for e in range(E) if counts[layer, e]}
