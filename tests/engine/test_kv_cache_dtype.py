"""`--kv-cache-dtype fp8 | bfloat16` in the native engine: the blocks a budget buys, the bundled
model's greedy outputs against `auto`, a real server with the flag, hybrid state slots and MLA."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch

from loadtest.benches.kv_fp8_quality import PROMPTS, compare, engine, generate
from models import load_model
from models.kv_cache_dtype import checkpoint_kv_scales, configure_kv_cache
from server.config import EngineConfig
from server.engine.factory import num_kv_blocks
from tests.conftest import BUNDLED

# fp8 flips a greedy token only where the reference's top two logits are nearly tied: the
# perturbation fp8 rounding (3 mantissa bits: <= 6.25% per K/V value) puts on this model's
# logits stays small, so a flip at a margin above this bound means a broken read or write (a
# wrong scale, misread bytes), which changes the logits by whole units. Measured with `python -m
# loadtest kv-fp8-quality`: every flip at a margin <= 0.17 (float32 and bfloat16 weights).
MAX_FLIP_MARGIN = 0.25
# at least this many of the 20 prompts keep their 16 greedy tokens (14 measured with float32)
MIN_IDENTICAL = 10


def test_fp8_doubles_the_blocks_against_bf16():
    """The same --kv-cache-memory holds 2x the blocks of a bf16 cache (4x a float32 one: checked
    on the engines of test_bundled_model_greedy_outputs_with_fp8)."""
    model = load_model(str(BUNDLED), dtype="bfloat16", progress=False)
    budget = 3 * 2**20
    blocks = {}
    for name in ("auto", "fp8", "fp8_e4m3"):
        configure_kv_cache(model, name)
        blocks[name] = num_kv_blocks(EngineConfig(kv_cache_memory=budget, block_size=16), model)
    per_token = model.config.kv_bytes_per_token(1)  # values per token over all layers, one byte each in fp8
    assert blocks["fp8"] == blocks["fp8_e4m3"] == budget // (16 * per_token)
    assert blocks["fp8"] == 2 * blocks["auto"]
    caches = model.allocate_kv_cache(4, 16)
    assert all(t.dtype == torch.float8_e4m3fn for pair in caches for t in pair)


@pytest.fixture(scope="module")
def fp8_engine():
    return engine("float32", "fp8")


@pytest.fixture(scope="module")
def bf16_engine():
    return engine("float32", "bfloat16")


@pytest.fixture(scope="module")
def f32_reference():
    """The float32 cache's greedy outputs on the 20 prompts (16 tokens each)."""
    return generate(engine("float32", "auto"), 16)


def test_bundled_model_greedy_outputs_with_fp8(fp8_engine, f32_reference):
    """The default CPU path (float32, the C decode kernel, prefill reading the fp8 cache) on the
    20 prompts of `python -m loadtest kv-fp8-quality`."""
    ref = f32_reference
    got = generate(fp8_engine, 16)
    assert (ref["cache_dtype"], got["cache_dtype"]) == ("float32", "float8_e4m3fn")
    assert got["blocks"] == 4 * ref["blocks"]
    cmp = compare(ref, got)
    assert cmp["prompts"] == len(PROMPTS) == 20
    assert cmp["identical"] >= MIN_IDENTICAL, cmp
    assert all(d["ref_margin"] < MAX_FLIP_MARGIN for d in cmp["differences"]), cmp


def test_bundled_model_greedy_outputs_with_bf16(bf16_engine, f32_reference):
    """`--kv-cache-dtype bfloat16` on the float32 model (the C decode kernel widening in
    registers, prefill reading the rounded cache): half the bytes, so twice the blocks, and the
    same greedy tokens as the float32 cache (measured: 20 of 20 prompts identical over 16 tokens;
    a flip is allowed only at a near tie, as for fp8)."""
    ref = f32_reference
    got = generate(bf16_engine, 16)
    assert (ref["cache_dtype"], got["cache_dtype"]) == ("float32", "bfloat16")
    assert got["blocks"] == 2 * ref["blocks"]
    cmp = compare(ref, got)
    assert cmp["identical"] >= 18, cmp
    assert all(d["ref_margin"] < MAX_FLIP_MARGIN / 4 for d in cmp["differences"]), cmp


@pytest.mark.parametrize("kind", ["fp8", "bfloat16"])
def test_outputs_do_not_depend_on_chunking_or_prefix_hits(kind, request):
    """Prefill chunks and prefix-cache hits read the fp8 / bfloat16 blocks; a whole-prompt prefill
    attends the same converted values: greedy outputs identical whichever way a prompt goes in."""
    whole_engine = request.getfixturevalue("fp8_engine" if kind == "fp8" else "bf16_engine")
    from server.engine.request import SamplingParams

    prompts = [" ".join(PROMPTS[i:i + 4]) for i in (0, 8)]  # ~40-60 tokens each
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)

    def run(llm):
        outs = [r.outputs[0] for r in llm.generate(prompts, sp, use_tqdm=False)]
        return [o.token_ids for o in outs], torch.tensor([[lp.logprob for lp in o.logprobs or []] for o in outs])

    def close(a, b):  # same tokens; logprobs equal up to float32 summation order (a prefill that
        # attended the unquantized K/V instead would differ by ~7e-3 here)
        return a[0] == b[0] and (a[1] - b[1]).abs().max().item() < 1e-4

    hits = whole_engine.core.total_prefix_hit_tokens
    whole = run(whole_engine)  # whole prompts in one prefill each (2048-token steps), no cached prefix
    assert whole_engine.core.total_prefix_hit_tokens == hits
    chunked = engine("float32", kind, max_num_batched_tokens=16)
    assert close(run(chunked), whole)
    assert close(run(chunked), whole)  # the prompts' full blocks are prefix-cache hits now
    assert chunked.core.total_prefix_hit_tokens > 0


@pytest.mark.parametrize(("flag", "stored", "elem"), [("fp8", "float8_e4m3fn", 1), ("bfloat16", "bfloat16", 2)])
def test_server_with_a_kv_cache_dtype(flag, stored, elem, tmp_path):
    from tests.server.conftest import start_server

    server = start_server(["--kv-cache-dtype", flag, "--kv-cache-memory", "1MiB", "--block-size", "16",
                           "--max-model-len", "256", "--seed", "0"], tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/version").json()["kv_cache_dtype"] == stored
            assert f'cache_dtype="{flag}"' in next(line for line in c.get("/metrics").text.splitlines()
                                                   if line.startswith("vllm:cache_config_info{"))
            name = c.get("/v1/models").json()["data"][0]["id"]
            for prompt in ("The with statement is used to", "Decorators are"):
                r = c.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 24,
                                                    "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 24
        per_block = 16 * 4 * 2 * 2 * 64 * elem  # 16 tokens x 4 layers x (K, V) x 2 KV heads x 64, elem bytes each
        assert f"KV cache {2**20 // per_block} blocks x 16 tokens ({stored}" in server.logs()
    finally:
        assert server.stop() == 0


def test_bad_kv_cache_dtype_is_a_clear_startup_error():
    r = subprocess.run([sys.executable, "-m", "server.cli", "--kv-cache-dtype", "int8"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "--kv-cache-dtype" in r.stderr and "fp8_e4m3" in r.stderr and "bfloat16" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, bfloat16, fp8, fp8_e4m3"):
        EngineConfig(kv_cache_dtype="fp16")  # type: ignore[arg-type]


def test_mla_takes_fp8_and_hybrid_state_stays_in_model_dtype(checkpoint):
    """MLA's latent cache is stored in fp8 (no refusal; its kernels: tests/models/kernels/
    test_mla_kv_dtypes.py); a hybrid model's linear-attention state slots keep the model dtype."""
    from server.engine.llm import LLM
    from server.engine.request import SamplingParams

    path = checkpoint("deepseek_v3")[0]
    mla = load_model(path, dtype="float32", progress=False)
    assert configure_kv_cache(mla, "fp8") == torch.float8_e4m3fn
    assert all(t.dtype == torch.float8_e4m3fn for pair in mla.allocate_kv_cache(2, 16) for t in pair)
    # the engine end to end: chunked prefill over the fp8 latent blocks, the C MLA decode kernel
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(path, dtype="float32", kv_cache_dtype="fp8", kv_cache_memory=2**20, block_size=4,
              max_num_batched_tokens=16)
    assert llm.model_info.kv_cache_dtype == "float8_e4m3fn"
    outs = llm.generate(["one two three four five six seven eight nine ten eleven", "hello"], sp, use_tqdm=False)
    assert [len(r.outputs[0].token_ids) for r in outs] == [6, 6]
    hybrid = load_model(checkpoint("qwen3_next")[0], dtype="float32", progress=False)
    configure_kv_cache(hybrid, "fp8")
    caches = hybrid.allocate_kv_cache(4, 16, num_state_slots=2)
    attention = set(hybrid.kv_layers())
    assert attention and len(attention) < len(caches)
    for i, pair in enumerate(caches):
        if i in attention:
            assert all(t.dtype == torch.float8_e4m3fn for t in pair)
        else:
            assert all(t.dtype == torch.float32 for t in pair)


def test_checkpoint_kv_scales_are_read(tmp_path):
    """vLLM's checkpoint names for the scales (k_proj.k_scale / v_proj.v_scale, or one kv_scale)."""
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.5),
               "model.layers.0.self_attn.v_proj.v_scale": torch.tensor(0.25),
               "model.layers.2.self_attn.kv_scale": torch.tensor([2.0]),
               "model.layers.1.self_attn.q_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_kv_scales(str(tmp_path)) == {0: (0.5, 0.25), 2: (2.0, 2.0)}


def test_vllm_engine_gets_the_flag():
    from server.engine.vllm.args import engine_args_kwargs

    def kw(value):
        return engine_args_kwargs(EngineConfig(engine="vllm", model="/m", kv_cache_dtype=value), on_cpu=True,
                                  environ={})

    assert kw("fp8")["kv_cache_dtype"] == "fp8" and kw("fp8_e4m3")["kv_cache_dtype"] == "fp8_e4m3"
    assert "kv_cache_dtype" not in kw("auto")  # vLLM's own default, the model dtype
