"""The newer families through the real engine: greedy tokens equal transformers' with chunked
prefill, prefix-cache hits and preemption forced; routing stats, `usage.moe` and expert
placement for every family (dense layers have no experts); MLA sizes its cache by latents."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.models.simple_runner import greedy_generate
from models.registry import TINY_CONFIGS
from models.layers.attention_variants import AttentionVariant
from server.config import EngineConfig
from server.engine import LLM
from server.engine.factory import num_kv_blocks
from server.engine.native.placement.trace import RoutingRecorder
from server.engine.request import EngineRequest, SamplingParams
from server.metrics.usage import moe_usage
from tests.conftest import RoutingCollector
from tests.engine.units import prompts_of

# every tiny config the family registry marks for the engine (models/<family>.py, `TINY`): the
# default suite runs one family per attention path the engine has (MLA, sinks + sliding window,
# chunked + NoPE), the rest with `pytest -m slow tests/engine/test_families.py`
FAMILIES = [name for name, t in TINY_CONFIGS.items() if t.engine != "none"]
ENGINE_FAMILIES = [f if TINY_CONFIGS[f].engine == "default" else pytest.param(f, marks=pytest.mark.slow)
                   for f in FAMILIES]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPT_LENS = (5, 17, 40, 3, 33)


def hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_pool_empty(llm: LLM) -> None:
    core = llm.core
    assert not core.has_unfinished()
    assert core.pool.num_free == core.pool.num_blocks, "KV blocks leaked"
    if core.state_slots is not None:
        assert core.state_slots.num_free == core.state_slots.num_slots, "state slots leaked"


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_engine_greedy_matches_transformers(family, checkpoint):
    path, ref = checkpoint(family)
    # 28 blocks x 4 tokens for ~180 tokens of work: preemption; a 16-token budget chunks every
    # long prompt (chunks straddle the sliding windows / attention chunks of 8); repeated
    # prompts hit the prefix cache (MLA: cached latents)
    # (a window on every layer: each sequence holds ~4 blocks, the rest are released; 20 then preempt)
    blocks = 20 if family == "mixtral-sliding" else 28
    llm = LLM(path, dtype="float32", num_kv_blocks=blocks, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = prompts_of(PROMPT_LENS)
    prompts += [prompts[2], prompts[4][:28] + [7, 9]]
    results = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, r in zip(prompts, results):
        assert r.outputs[0].token_ids == hf_greedy(ref, p, 16), f"{family}: prompt of {len(p)} tokens"
    assert llm.core.total_preemptions > 0, "the tiny KV budget should force preemption"
    if llm.core.model.config.hybrid:  # recurrent states are not in the blocks: no prefix cache
        assert not llm.core.pool.enable_prefix_caching and llm.core.total_prefix_hit_tokens == 0
    else:
        assert llm.core.total_prefix_hit_tokens > 0, "repeated prompts should hit the prefix cache"
    check_pool_empty(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_usage_and_placement(family, checkpoint, tmp_path):
    path, _ = checkpoint(family)
    base = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4)
    cfg = base.core.model.config
    moe_layers = [i for i, s in enumerate(cfg.sparse_layers) if s]
    seen = RoutingCollector()
    trace = RoutingRecorder.for_model(str(tmp_path / "trace.jsonl"), base.core.model)
    base.core.routing_listeners += [seen, trace]
    prompt = prompts_of([13])[0]
    base.core.add_request(EngineRequest("r", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    outs = []
    while base.core.has_unfinished():
        outs += base.core.step()[0]
    final = outs[-1]
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    # routing counters: one row per MoE layer (dense layers have none), every token x top_k, the
    # assignments to zero-computation experts (LongCat) counted apart, as their own kind
    assert all(s.num_layers == len(moe_layers) and s.num_experts == cfg.num_experts for s in seen)
    ran = len(prompt) + len(tokens) - 1  # every token that went through the model
    zero = sum(sum(s.zero_expert_tokens) for s in seen) if cfg.zero_experts else 0
    if cfg.zero_experts:
        assert 0 < zero < ran * len(moe_layers) * cfg.top_k, "the tiny config routes to both kinds"
    else:
        assert all(s.zero_expert_tokens is None for s in seen)
    assert sum(sum(map(sum, s.expert_tokens)) for s in seen) + zero == ran * len(moe_layers) * cfg.top_k
    assert sum(sum(s.device_tokens.values()) for s in seen) + zero == ran * len(moe_layers) * cfg.top_k
    usage = moe_usage([final.metrics])
    assert len(usage["distinct_experts_per_layer"]) == len(moe_layers)
    assert usage["expert_assignments"] == ran * len(moe_layers) * cfg.top_k - zero
    assert usage.get("zero_expert_assignments") == (zero if cfg.zero_experts else None)
    trace.close()  # the routing trace: every step's tokens, the zero-computation assignments apart
    steps = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()[1:]]
    assert sum(st["tokens"] for st in steps) == ran
    assert sum(sum(st.get("zero_expert_tokens", [])) for st in steps) == zero
    assert usage["max_routing_entropy_bits"] == round(math.log2(cfg.num_experts), 4)
    check_pool_empty(base)
    # expert placement over two devices with a replica: the same greedy tokens
    placed = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, expert_devices=("cpu:0", "cpu:1"),
                 num_redundant_experts=1)
    again = placed.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert again[0].outputs[0].token_ids == tokens
    rows = placed.core.placement_info().rows
    assert len(rows) == len(moe_layers) * (cfg.num_experts + 1)
    check_pool_empty(placed)


def test_sliding_window_and_chunks_are_exercised(checkpoint):
    """Without their window / chunking, gpt-oss and Llama 4 would give other tokens: the engine
    tests above would catch a path that ignored them."""
    for family in ("gpt_oss", "llama4", "mixtral-sliding"):
        path, _ = checkpoint(family)
        llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4)
        model = llm.core.model
        prompt = prompts_of([40])[0]
        with_variant = greedy_generate(model, [prompt], 12)[0]
        for layer in model.layers:
            layer.attn.variant = AttentionVariant(sinks=layer.attn.variant.sinks)  # plain causal
        assert greedy_generate(model, [prompt], 12)[0] != with_variant, family


def test_mla_cache_holds_latents_and_sizes_the_pool(checkpoint):
    path, _ = checkpoint("deepseek_v3")
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 20, block_size=4)
    model, cfg = llm.core.model, llm.core.model.config
    # per token and layer: the latent (32) and the rotary key (8), float32; not per-head K and V
    per_token = cfg.num_layers * (32 + 8) * 4
    assert model.kv_bytes_per_block(4) == 4 * per_token
    expanded = cfg.num_layers * 2 * cfg.num_heads * (16 + 8) * 4  # what a GQA-style cache would hold
    assert expanded > 4 * per_token
    blocks = num_kv_blocks(EngineConfig(model=path, kv_cache_memory=1 << 20, block_size=4), model)
    assert llm.core.pool.num_blocks == blocks == (1 << 20) // (4 * per_token)
    allocated = sum(t.numel() * t.element_size() for pair in llm.core.runner.kv_caches for t in pair)
    assert allocated == (blocks + 1) * model.kv_bytes_per_block(4)  # + 1: the runner's scratch block
    assert [tuple(t.shape) for t in llm.core.runner.kv_caches[0]] == [(blocks + 1, 4, 1, 32), (blocks + 1, 4, 1, 8)]
    # usage counts blocks of latents: a 10-token prompt holds 3 blocks of 4
    core = llm.core
    core.add_request(EngineRequest("u", prompts_of([10])[0], SamplingParams(max_tokens=3, ignore_eos=True)))
    core.step()
    assert core.pool.usage == pytest.approx(3 / blocks)
    while core.has_unfinished():
        core.step()
    check_pool_empty(llm)


def test_mla_family_served_over_http(checkpoint, tmp_path):
    """A real server on the DeepSeek-V3 checkpoint: `--kv-cache-memory` divided by the latent
    bytes per block, `usage.moe` and the routing series over its 2 MoE layers (of 3)."""
    import re

    import httpx

    from tests.server.conftest import start_server

    path, _ = checkpoint("deepseek_v3")
    per_block = 4 * 3 * (32 + 8) * 4  # block of 4 tokens x 3 layers x (latent + rotary key) x float32
    server = start_server(["--model", path, "--dtype", "float32", "--kv-cache-memory", "1MiB", "--block-size", "4",
                           "--max-model-len", "128", "--seed", "0"], tmp_path)
    try:
        assert f"KV cache {(1 << 20) // per_block} blocks x 4 tokens" in server.logs()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            name = c.get("/v1/models").json()["data"][0]["id"]
            r = c.post("/v1/completions", json={"model": name, "prompt": "The list data type", "max_tokens": 6,
                                                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            text = c.get("/metrics").text
        assert len(usage["moe"]["distinct_experts_per_layer"]) == 2
        assert usage["moe"]["expert_assignments"] == (usage["total_tokens"] - 1) * 2 * 2
        layers = set(re.findall(r'moe_expert_tokens_total\{[^}]*layer="(\d+)"', text))
        assert len(layers) == 2
    finally:
        assert server.stop() == 0


def test_zero_computation_experts_served_over_http(checkpoint, tmp_path):
    """LongCat-Flash over a real server: assignments to zero-computation experts are their own
    kind in `usage.moe`, `/metrics` and `/v1/moe/routing` (with the expert assignments they add
    up to tokens x MoE layers x top-k), and `return_routing` shows them under their own ids."""
    import re

    import httpx

    from tests.server.conftest import start_server

    path, _ = checkpoint("longcat_flash")
    server = start_server(["--model", path, "--dtype", "float32", "--kv-cache-memory", "1MiB", "--block-size", "4",
                           "--max-model-len", "128", "--seed", "0"], tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            name = c.get("/v1/models").json()["data"][0]["id"]
            r = c.post("/v1/completions", json={"model": name, "prompt": "The list data type", "max_tokens": 8,
                                                "temperature": 0, "ignore_eos": True, "return_routing": True})
            assert r.status_code == 200, r.text
            body = r.json()
            text = c.get("/metrics").text
            snap = c.get("/v1/moe/routing").json()
        layers, k, experts = 2, 3, 8  # the tiny config: 2 MoE layers (of 4 sublayers), top-3 of 8 + 4 zero
        usage = body["usage"]
        moe = usage["moe"]
        zero = moe["zero_expert_assignments"]
        assert 0 < zero < moe["expert_assignments"] + zero == (usage["total_tokens"] - 1) * layers * k
        series = re.findall(r'moe_zero_expert_tokens_total\{[^}]*layer="(\d+)"\} (\d+)', text)
        assert len(series) == layers and sum(int(v) for _, v in series) == zero
        assert sum(snap["zero_expert_tokens_per_layer"]) == zero
        expert_series = re.findall(r'moe_expert_tokens_total\{[^}]*\} (\d+)', text)
        assert sum(int(v) for v in expert_series) == moe["expert_assignments"]
        choice = body["choices"][0]
        ids = [i for tok in choice["routing"] + choice["prompt_routing"] for layer in tok for i in layer]
        assert all(0 <= i < experts + 4 for i in ids)
        assert sum(i >= experts for i in ids) == zero  # every token the request ran, generated and prompt
    finally:
        assert server.stop() == 0
