"""Expert placement with the weights kept in a quantized checkpoint's format (issue 27, build item 1):
the devices' stacks, replicas, rebalancing moves and the CPU tier carry the QTensors and their
scales, never a dequantized copy, and give the unplaced model's outputs.

Two tiny random Mixtral checkpoints: FP8 with 16x16 block scales (DeepSeek-V3's layout) and GPTQ
INT4 (groups of 32, symmetric). Each is loaded once (its experts kept as QTensors) and its
unplaced logits and greedy continuations are the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import load_model
from models.quant.stack import QStack
from server.engine.native.placement.manager import NEVER_FETCH, PlacementManager
from tests.conftest import save_test_tokenizer
from tests.models.conftest import make_checkpoint
from tests.models.simple_runner import greedy_generate, prefill_logits

from .conftest import PROMPTS
from .test_executor import CPU2, HostReads

FORMATS = {"fp8_block": "fp8_block", "gptq": "int4_group"}


def _fp8_block(path) -> None:
    from tests.models.test_quant import fp8_tiles, rewrite

    def quantize(name, w):
        q, scale, deq = fp8_tiles(w, 16, 16)
        return {name: q, name + "_scale_inv": scale}, deq

    rewrite(path, quantize, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [16, 16]})


_BUILT: dict[str, tuple] = {}


def build(method: str, tmp_path_factory) -> tuple:
    """(method, the model with its experts kept quantized, unplaced logits, unplaced greedy tokens,
    the checkpoint's path), made once per module run."""
    from tests.quant_checkpoints import quantize_checkpoint

    if method not in _BUILT:
        src = tmp_path_factory.mktemp(f"q-{method}")
        make_checkpoint("mixtral", src, seed=3, num_hidden_layers=2)
        save_test_tokenizer(src)  # the engine test's
        path = src
        if method == "fp8_block":
            _fp8_block(src)
        else:
            path = src.parent / f"{src.name}-gptq"
            quantize_checkpoint(src, path, "gptq", bits=4, group_size=32, sym=True)
        model = load_model(str(path), dtype="float32", device="cpu", progress=False)
        for b in model.moe_blocks():
            b.executor = None
        _BUILT[method] = (method, model, prefill_logits(model, PROMPTS), greedy_generate(model, PROMPTS, 8), str(path))
    return _BUILT[method]


@pytest.fixture(scope="module", autouse=True)
def _forget():
    yield
    _BUILT.clear()


@pytest.fixture(scope="module", params=sorted(FORMATS))
def qmodel(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@pytest.fixture()
def placed(qmodel):
    """The model with no placement left behind after the test."""
    method, model, *_ = qmodel
    yield qmodel
    for b in model.moe_blocks():
        b.executor = None


def expert_params(model):
    return [(model.qweights[f"layers.{b.layer_idx}.moe.w13"], model.qweights[f"layers.{b.layer_idx}.moe.w2"])
            for b in sorted(model.moe_blocks(), key=lambda b: b.layer_idx)]


def assert_quantized_stacks(model, mgr, fmt: str) -> None:
    """Every device stack is a QStack in the checkpoint's format; the model holds no float expert
    stack (its expert parameters are meta shapes) and the executor's resident bytes are the
    quantized bytes of the experts each device holds."""
    assert all(p.device.type == "meta" for b in model.moe_blocks() for p in (b.w13, b.w2))
    per_expert = sum(q13.nbytes + q2.nbytes for q13, q2 in expert_params(model)) // (
        len(mgr.layer_ids) * mgr.num_experts)
    assert mgr.expert_bytes == per_expert
    want: dict[str, int] = {}
    for li, state in enumerate(mgr.executor.states.values()):
        for gi, g in enumerate(state.groups):
            assert isinstance(g.w13, QStack) and isinstance(g.w2, QStack), type(g.w13)
            assert g.w13.fmt.value == fmt and g.packed is None
            assert g.w13.q.data.dtype in (torch.float8_e4m3fn, torch.uint8)
            if state.host is None or gi != state.host.group:
                want[g.name] = want.get(g.name, 0) + len(g.logicals) * per_expert
            else:  # the tier is the master stacks, in place
                assert state.host.in_place and state.host.fmt == fmt and state.host.packed is None
                assert g.w13.q.data.data_ptr() == expert_params(model)[li][0].q.data.data_ptr()
                want.setdefault(g.name, 0)
    assert mgr.executor.resident_bytes() == want


def assert_same(model, logits, tokens) -> None:
    for a, b in zip(prefill_logits(model, PROMPTS), logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert greedy_generate(model, PROMPTS, 8) == tokens


def decode_cases(mgr, T_values=(1, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    H = mgr.model.config.hidden_size
    E, k = mgr.num_experts, mgr.top_k
    return [(layer_idx, torch.randn(T, H, generator=gen), torch.stack([torch.randperm(E, generator=gen)[:k]
                                                                        for _ in range(T)]),
             torch.rand(T, k, generator=gen)) for T in T_values for layer_idx in mgr.layer_ids]


def unplaced(model, layer_idx, x, ids, w):
    block = next(b for b in model.moe_blocks() if b.layer_idx == layer_idx)
    return block.packed_experts(x, ids, w, block.variant)


@pytest.mark.parametrize("kwargs", [dict(num_redundant=2, policy="balanced"), dict(budget="2")],
                         ids=["replicas", "cpu-tier"])
def test_placed_quantized_experts_match_unplaced(placed, monkeypatch, kwargs):
    method, model, logits, tokens, _ = placed
    loads = np.random.default_rng(0).pareto(1.0, (2, 8)) * 10
    mgr = PlacementManager(model, CPU2, initial_loads=loads, **kwargs)
    assert_quantized_stacks(model, mgr, FORMATS[method])
    if "budget" in kwargs:
        tier = mgr.tier_info()
        assert tier == {"format": FORMATS[method], "bytes": 2 * 4 * mgr.expert_bytes, "in_place": True}
        assert f"CPU expert tier: {FORMATS[method]}" in model.kernel_plan.table()
    else:
        assert mgr.placement.num_replicas_used == 4
    # decode-sized passes: nothing read back to the host, the unplaced result
    cases = decode_cases(mgr)
    reads = HostReads(monkeypatch)
    with torch.inference_mode():
        got = [mgr.executor(*case) for case in cases]
    assert reads.calls == []
    monkeypatch.undo()
    for case, y in zip(cases, got):
        torch.testing.assert_close(y, unplaced(model, *case), atol=1e-5, rtol=1e-5)
    assert (mgr.executor._worker is not None) == ("budget" in kwargs)  # the tier ran on its thread
    assert_same(model, logits, tokens)
    mgr.close()


def test_rebalance_moves_qtensor_slices(placed):
    """A rebalance moves experts between the devices as QTensor slices (their bytes, scales
    included, bit for bit the master's), outputs unchanged; the CPU tier's copy-in too."""
    method, model, logits, tokens, _ = placed
    mgr = PlacementManager(model, CPU2, budget="3", fetch_threshold=2)
    before = {li: [g.logicals for g in st.groups] for li, st in mgr.executor.states.items()}
    loads = np.zeros((2, 8))
    loads[:, 5:] = 100.0  # the tier's experts turn hot: they move onto the devices
    assert mgr.rebalance(loads) and mgr.experts_moved > 0
    assert {li: [g.logicals for g in st.groups] for li, st in mgr.executor.states.items()} != before
    assert_quantized_stacks(model, mgr, FORMATS[method])
    for (q13, q2), state in zip(expert_params(model), mgr.executor.states.values()):
        for gi, g in enumerate(state.groups):
            if gi == state.host.group:
                continue
            idx = torch.tensor(g.logicals)
            for got, master in ((g.w13, q13), (g.w2, q2)):
                for a, b in zip(got.q.tensors(), master.q[idx].tensors()):
                    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert_same(model, logits, tokens)  # prefill steps copy the tier's busy experts in (threshold 2)
    mgr.close()


def test_cpu_tier_refuses_other_formats_for_quantized_experts(placed):
    method, model, *_ = placed
    with pytest.raises(ValueError, match=f"kept in the checkpoint's {FORMATS[method]} format.*"
                                         f"use --cpu-expert-format auto"):
        PlacementManager(model, CPU2, budget="2", tier_format="int8")
    mgr = PlacementManager(model, CPU2, budget="2", fetch_threshold=NEVER_FETCH)
    assert mgr.tier_info()["format"] == FORMATS[method]
    mgr.close()


def test_engine_places_the_quantized_experts(tmp_path_factory, tiny_mixtral):
    """The engine loads a quantized checkpoint kept quantized with placement asked (no dequantized
    fallback): greedy outputs of the unplaced model; --quantization int8 with placement still refused."""
    from server.engine import LLM, SamplingParams

    _, model, _, _, path = build("gptq", tmp_path_factory)
    for b in model.moe_blocks():
        b.executor = None
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [greedy_generate(model, [p], 6)[0] for p in PROMPTS[:2]]
    llm = LLM(path, dtype="float32", device="cpu", max_num_seqs=2, expert_devices=("cpu:0", "cpu:1"),
              num_redundant_experts=1, kv_cache_memory=8 * 2**20)
    m = llm.core.model
    assert m.qweights and all(b.executor is not None for b in m.moe_blocks())
    assert all(isinstance(g.w13, QStack) for st in llm.core.placement_manager.executor.states.values()
               for g in st.groups)
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS[:2], greedy, use_tqdm=False)]
    assert got == want
    llm.core.placement_manager.close()
    with pytest.raises(ValueError, match="--quantization int8 keeps the experts only quantized.*cannot move them"):
        LLM(tiny_mixtral, dtype="float32", device="cpu", quantization="int8", expert_devices=("cpu:0", "cpu:1"))

    # --quantization fp8 (fp8_channel QTensors made at load) is placed the same way, the CPU tier too
    def run(**kw):
        llm = LLM(tiny_mixtral, dtype="float32", device="cpu", max_num_seqs=2, quantization="fp8",
                  kv_cache_memory=8 * 2**20, **kw)
        return llm, [r.outputs[0].token_ids for r in llm.generate(PROMPTS[:2], greedy, use_tqdm=False)]

    _, want_fp8 = run()
    tier, got_fp8 = run(expert_devices=("cpu:0",), gpu_expert_budget="5")
    mgr = tier.core.placement_manager
    assert mgr.tier_info()["format"] == "fp8_channel" and mgr.tier_info()["in_place"]
    assert all(isinstance(g.w13, QStack) and g.w13.fmt.value == "fp8_channel"
               for st in mgr.executor.states.values() for g in st.groups)
    assert got_fp8 == want_fp8
    mgr.close()


def test_gpt_oss_mxfp4_experts_placed_with_their_biases(tmp_path):
    """gpt-oss's MXFP4 experts (biased, clamped SwiGLU): replicas and the CPU tier carry the MXFP4
    stacks with their biases; the unplaced model's greedy tokens and logits."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.models.test_quant import mxfp4_pack

    make_checkpoint("gpt_oss", tmp_path, seed=7)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4_pack(tensors.pop(name).transpose(1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    prompts = PROMPTS[:2]
    want_tokens, want_logits = greedy_generate(m, prompts, 6), prefill_logits(m, prompts)
    for kwargs in (dict(num_redundant=2, policy="balanced"), dict(budget="1")):
        mgr = PlacementManager(m, CPU2, **kwargs)
        assert (mgr.host is not None) == ("budget" in kwargs)
        for st in mgr.executor.states.values():
            for gi, g in enumerate(st.groups):
                assert isinstance(g.w13, QStack) and isinstance(g.w2, QStack) and g.w13.fmt.value == "mxfp4"
                rows = m.config.num_experts if st.host is not None and gi == st.host.group else len(g.logicals)
                assert g.w13.bias is not None and g.w2.bias is not None and len(g.w13.bias) == len(g.w2.bias) == rows
        assert greedy_generate(m, prompts, 6) == want_tokens
        for a, b in zip(prefill_logits(m, prompts), want_logits):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        mgr.close()
        for b in m.moe_blocks():
            b.executor = None


def random_qtensor(fmt: str, E: int, N: int, K: int, gen: torch.Generator):
    """A random [E, N, K] QTensor in `fmt` (values of a well-scaled weight)."""
    from models.quant.formats import QTensor, WeightFormat

    f = WeightFormat(fmt)
    shape = (E, N, K)
    if f in (WeightFormat.FP8_BLOCK, WeightFormat.FP8_CHANNEL, WeightFormat.FP8_TENSOR):
        data = (torch.randn(shape, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        block = (16, 16) if f == WeightFormat.FP8_BLOCK else None
        s = {WeightFormat.FP8_BLOCK: (N // 16, K // 16), WeightFormat.FP8_CHANNEL: (N, 1)}.get(f, (1, 1))
        return QTensor(f, shape, data, torch.rand((E,) + s, generator=gen) * 1e-3 + 1e-4, block=block)
    if f == WeightFormat.INT8_CHANNEL:
        data = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        return QTensor(f, shape, data, torch.rand(E, N, 1, generator=gen) * 1e-3 + 1e-4)
    codes = torch.randint(0, 256, (E, N, K // 2), generator=gen, dtype=torch.uint8)
    if f == WeightFormat.MXFP4:
        return QTensor(f, shape, codes, torch.randint(118, 124, (E, N, K // 32), generator=gen, dtype=torch.uint8),
                       group=32)
    zero = torch.randint(0, 16, (E, N, K // 32), generator=gen, dtype=torch.uint8)
    return QTensor(f, shape, codes, (torch.rand(E, N, K // 32, generator=gen) * 0.02).to(torch.bfloat16), zero=zero,
                   group=32)


@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_channel", "fp8_tensor", "mxfp4", "int4_group", "int8_channel"])
def test_every_format_placed_with_replicas_and_the_cpu_tier(fmt, monkeypatch):
    """Each format's stacks through the executor (two virtual devices with replicas, then with the
    CPU tier): QStacks of that format on every device, the unplaced `qmoe` result; decode-sized
    passes read nothing back, a prefill-sized one takes the compact dispatch."""
    from models.placement.executor import SYNC_FREE_TOKENS, build_layer_state, run_layer
    from models.placement.planner import place
    from models.quant.ops import qmoe_reference
    from models.quant.stack import qmoe_stack

    E, H, inter, k = 6, 64, 32, 2
    gen = torch.Generator().manual_seed(11)
    b13, b2 = torch.randn(E, 2 * inter, generator=gen) * 0.1, torch.randn(E, H, generator=gen) * 0.1
    m13 = QStack(random_qtensor(fmt, E, 2 * inter, H, gen), b13)
    m2 = QStack(random_qtensor(fmt, E, H, inter, gen), b2)
    loads = np.random.default_rng(2).pareto(1.0, (1, E)) * 10
    plans = [place("balanced", loads, CPU2, [4, 4], 2).layers[0],
             place("contiguous", loads, CPU2, [2, 2], 0, host="cpu").layers[0]]
    cases = []
    for T in (1, 3, SYNC_FREE_TOKENS + 4):
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        cases.append((torch.randn(T, H, generator=gen), ids, torch.rand(T, k, generator=gen)))
    for plan in plans:
        state, copied = build_layer_state(plan, m13, m2, torch.device("cpu"), qmoe_stack, host="cpu")
        assert copied == sum(len(g.logicals) for g in state.groups if state.host is None or g is not
                             state.groups[state.host.group])
        for g in state.groups:
            assert isinstance(g.w13, QStack) and g.w13.fmt.value == fmt and g.w2.fmt.value == fmt
        reads = HostReads(monkeypatch)
        with torch.inference_mode():
            got = [run_layer(state, *case) for case in cases[:2]]
        assert reads.calls == []
        monkeypatch.undo()
        got.append(run_layer(state, *cases[2]))
        for (x, ids, w), y in zip(cases, got):
            want = qmoe_reference(x, m13.q, m2.q, ids, w, b13=b13, b2=b2)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
