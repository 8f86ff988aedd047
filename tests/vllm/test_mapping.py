"""The vLLM adapter's pure parts (no vLLM needed): config and sampling mapping, logprob and stats
conversion. Runs in the default suite."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from server.config import ConfigError, EngineConfig
from server.engine.request import SamplingParams, SamplingParamsError
from server.engine.vllm.args import DEFAULT_CPU_KV_BYTES, EXTRA_ARGS_ENV, engine_args_kwargs, multi_node_defaults
from server.engine.vllm.sampling import StreamState, finish_reason, to_logprob, to_vllm_sampling_kwargs
from server.engine.vllm.stats import StatsBridge, routing_from_experts


def kwargs(on_cpu: bool = False, env: dict | None = None, **cfg):
    return engine_args_kwargs(EngineConfig(engine="vllm", model="/m", **cfg), on_cpu=on_cpu, environ=env or {})


def test_scale_flags_pass_through_with_vllms_names():
    kw = kwargs(tensor_parallel_size=2, data_parallel_size=4, enable_expert_parallel=True, enable_eplb=True,
                eplb_config='{"window_size": 500}', num_redundant_experts=8, rebalance_interval=100,
                gpu_memory_utilization=0.8, max_model_len=4096, max_num_seqs=32, max_num_batched_tokens=8192,
                block_size=32, enable_prefix_caching=False, seed=3, dtype="bf16", served_model_name="m",
                expert_placement="round_robin", kv_cache_memory=2**30, scheduling_policy="priority")
    assert kw["tensor_parallel_size"] == 2 and kw["data_parallel_size"] == 4
    assert kw["enable_expert_parallel"] and kw["enable_eplb"]
    assert kw["eplb_config"] == {"window_size": 500, "num_redundant_experts": 8, "step_interval": 100}
    assert kw["gpu_memory_utilization"] == 0.8 and kw["max_model_len"] == 4096
    assert (kw["max_num_seqs"], kw["max_num_batched_tokens"], kw["block_size"]) == (32, 8192, 32)
    assert kw["enable_prefix_caching"] is False and kw["seed"] == 3 and kw["dtype"] == "bfloat16"
    assert kw["served_model_name"] == "m" and kw["expert_placement_strategy"] == "round_robin"
    assert kw["kv_cache_memory_bytes"] == 2**30 and kw["scheduling_policy"] == "priority"
    assert kw["disable_log_stats"] is True and kw["max_logprobs"] == 20
    assert kwargs()["expert_placement_strategy"] == "linear"


def test_speculative_config_is_passed_as_written():
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    assert kwargs(speculative_config=spec)["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    assert "speculative_config" not in kwargs()


def test_cpu_defaults():
    kw = kwargs(on_cpu=True)
    assert kw["kv_cache_memory_bytes"] == DEFAULT_CPU_KV_BYTES  # not sized from host memory
    assert kw["block_size"] is None  # 16 is not a multiple of 32: vLLM's CPU attention picks
    assert kwargs(on_cpu=True, block_size=64)["block_size"] == 64
    assert "kv_cache_memory_bytes" not in kwargs(on_cpu=False)  # GPU: gpu_memory_utilization decides
    assert kwargs(device="cuda:3")["device_ids"] == [3]
    with pytest.raises(ConfigError, match="CPU build"):
        kwargs(on_cpu=True, device="cuda")


@pytest.mark.parametrize("cfg, flag", [
    ({"expert_placement": "balanced"}, "--expert-placement balanced"),
    ({"expert_devices": ("cuda:0",)}, "--expert-devices"),
    ({"gpu_expert_budget": "4GiB"}, "--gpu-expert-budget"),
    ({"cpu_expert_format": "int8"}, "--cpu-expert-format"),
    ({"record_routing": "/tmp/r.jsonl"}, "--record-routing"),
    ({"num_redundant_experts": 2}, "--num-redundant-experts"),
])
def test_native_only_options_are_rejected(cfg, flag):
    with pytest.raises(ConfigError, match="not supported by the vllm engine") as e:
        kwargs(**cfg)
    assert flag in str(e.value)


def test_extra_args_env():
    kw = kwargs(env={EXTRA_ARGS_ENV: '{"enforce_eager": true, "distributed_executor_backend": "ray"}'})
    assert kw["enforce_eager"] is True and kw["distributed_executor_backend"] == "ray"
    with pytest.raises(ConfigError, match=EXTRA_ARGS_ENV):
        kwargs(env={EXTRA_ARGS_ENV: "[1]"})
    with pytest.raises(ConfigError, match="eplb-config"):
        kwargs(enable_eplb=True, eplb_config="{nope")


def test_ray_only_when_the_layout_exceeds_the_node():
    assert multi_node_defaults({"tensor_parallel_size": 8}, 8, True) == {}
    assert multi_node_defaults({"tensor_parallel_size": 16}, 8, True) == {"distributed_executor_backend": "ray"}
    assert multi_node_defaults({"tensor_parallel_size": 8, "data_parallel_size": 2}, 8, True) == \
        {"data_parallel_backend": "ray"}
    assert multi_node_defaults({"tensor_parallel_size": 16}, 8, False) == {}  # no Ray installed
    assert multi_node_defaults({"tensor_parallel_size": 16, "distributed_executor_backend": "mp"}, 8, True) == {}


def test_sampling_params_map_one_to_one():
    sp = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, seed=11, max_tokens=20,
                        min_tokens=2, stop=["\n"], stop_token_ids=[5], ignore_eos=True, logprobs=2,
                        prompt_logprobs=1, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                        logit_bias={7: -100.0}, skip_special_tokens=False, include_stop_str_in_output=True)
    kw = to_vllm_sampling_kwargs(sp, 20)
    assert kw == dict(n=3, temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, seed=11, max_tokens=20, min_tokens=2,
                      stop=["\n"], stop_token_ids=[5], ignore_eos=True, logprobs=2, prompt_logprobs=1,
                      presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={7: -100.0},
                      skip_special_tokens=False, include_stop_str_in_output=True)
    assert to_vllm_sampling_kwargs(SamplingParams(top_k=-1), 16)["top_k"] == 0


def test_unsupported_sampling_is_a_named_param_error():
    with pytest.raises(SamplingParamsError) as e:
        to_vllm_sampling_kwargs(SamplingParams(n=2, temperature=0.0), 8)
    assert e.value.param == "n" and "not supported by the vllm engine" in e.value.message
    with pytest.raises(SamplingParamsError) as e:
        to_vllm_sampling_kwargs(SamplingParams(), 8, return_routing=True)
    assert e.value.param == "return_routing"


def lp(logprob, rank):
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_logprob_conversion():
    # sampled token 9 is outside the top 2: vLLM sends it plus the top 2
    out = to_logprob(9, {9: lp(-3.0, 7), 1: lp(-0.5, 1), 2: lp(-1.0, 2)}, 2)
    assert (out.token_id, out.logprob, out.top) == (9, -3.0, [(1, -0.5), (2, -1.0)])
    out = to_logprob(1, {1: lp(-0.5, 1), 2: lp(-1.0, 2)}, 2)  # sampled is the best
    assert out.top == [(1, -0.5), (2, -1.0)]
    assert to_logprob(4, {4: lp(-2.0, 3)}, 0).top == []
    assert math.isinf(to_logprob(4, None, 0).logprob)


def test_finish_reasons():
    class FR(int):  # like vLLM's IntEnum FinishReason, whose str() is the name
        def __str__(self):
            return ("stop", "length", "abort", "error", "repetition")[int(self)]

    assert [finish_reason(FR(i)) for i in range(5)] == ["stop", "length", "abort", "error", "stop"]
    assert finish_reason(None) is None and finish_reason("length") == "length"


class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, iteration, finished, routing):
        self.calls.append((iteration, finished, routing))


def sched(running, waiting, usage, queries=0, hits=0):
    return SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, num_skipped_waiting_reqs=0,
                           kv_cache_usage=usage, prefix_cache_stats=SimpleNamespace(queries=queries, hits=hits),
                           iteration_details=None)


def iteration(prompt=0, gen=0, finished=()):
    return SimpleNamespace(num_prompt_tokens=prompt, num_generation_tokens=gen,
                           prompt_token_stats=SimpleNamespace(computed=prompt), num_preempted_reqs=0,
                           time_to_first_tokens_iter=[0.1] if prompt else [],
                           inter_token_latencies_iter=[0.02] * max(0, gen - 1), finished_requests=list(finished))


def test_stats_bridge_converts_vllm_stats():
    rec = Recorder()
    bridge = StatsBridge([rec], n_of=lambda rid: {"a": 2}.get(rid, 1))
    bridge.record(sched(1, 2, 0.25, queries=10, hits=4), iteration(prompt=10, gen=1))
    it, fin, routing = rec.calls[-1]
    assert (it.num_running, it.num_waiting, it.kv_cache_usage) == (1, 2, 0.25)
    assert (it.num_prompt_tokens, it.num_generation_tokens, it.num_batched_tokens) == (10, 1, 11)
    assert (it.prefix_cache_queries, it.prefix_cache_hits) == (10, 4)
    assert it.time_to_first_tokens == [0.1] and fin == [] and routing is None
    done = SimpleNamespace(finish_reason="length", request_id="a", e2e_latency=1.0, queued_time=0.1,
                           prefill_time=0.2, decode_time=0.7, inference_time=0.9, num_prompt_tokens=10,
                           num_generation_tokens=5, max_tokens_param=5)
    bridge.record(sched(0, 0, 0.0), iteration(gen=1, finished=[done]))
    it, fin, _ = rec.calls[-1]
    assert it.num_running == 0 and fin[0].finish_reason == "length" and fin[0].n_param == 2
    assert (fin[0].e2e_latency, fin[0].num_generation_tokens, fin[0].max_tokens_param) == (1.0, 5, 5)
    n = len(rec.calls)
    bridge.record(None, None)  # nothing new: not forwarded
    bridge.record(sched(0, 0, 0.0), None)  # same gauges, no tokens: not forwarded
    assert len(rec.calls) == n
    bridge.record(sched(0, 1, 0.0), None)  # a gauge changed: forwarded
    assert len(rec.calls) == n + 1 and rec.calls[-1][0].num_waiting == 1


def test_stats_bridge_sums_data_parallel_engines():
    rec = Recorder()
    bridge = StatsBridge([rec], n_of=lambda rid: 1)
    bridge.record(sched(2, 0, 0.5), None, engine_idx=0)
    bridge.record(sched(3, 1, 0.1), None, engine_idx=1)
    it = rec.calls[-1][0]
    assert (it.num_running, it.num_waiting, it.kv_cache_usage) == (5, 1, pytest.approx(0.3))


def test_routing_from_routed_experts():
    np = pytest.importorskip("numpy")
    experts = np.array([[[0, 1], [2, 3]], [[0, 2], [3, 3]]])  # [tokens=2, layers=2, top_k=2]
    r = routing_from_experts(experts, 4, "cuda")
    assert r.expert_tokens == [[2, 1, 1, 0], [0, 0, 1, 3]] and r.device_tokens == {"cuda": 8}
    rec = Recorder()
    bridge = StatsBridge([rec], n_of=lambda rid: 1)
    bridge.add_routing(r)
    bridge.add_routing(r)
    bridge.record(None, None, force=True)
    assert rec.calls[-1][2].expert_tokens == [[4, 2, 2, 0], [0, 0, 2, 6]]


def fake_engine(routing_enabled: bool = False):
    """A VLLMEngine without vLLM: only what `_convert` uses."""
    from server.engine.protocol import ModelInfo
    from server.engine.admission import InFlight
    from server.engine.vllm import VLLMEngine

    eng = VLLMEngine.__new__(VLLMEngine)
    eng.routing_enabled = routing_enabled
    eng.device = "cuda"
    eng.model_info = ModelInfo("m", "/m", 512, 100, "MixtralForCausalLM", 2, 4, 2, "float32", "cuda")
    eng.in_flight = InFlight(4, 4)
    eng.in_flight.admit("r", 1)
    eng._loggers = []
    eng._bridge = StatsBridge(eng._loggers, n_of=lambda rid: 1)
    return eng


def vout(outputs, finished=False, prompt_logprobs=None):
    return SimpleNamespace(outputs=outputs, finished=finished, prompt_logprobs=prompt_logprobs, num_cached_tokens=0)


def comp(index, token_ids, text="", logprobs=None, finish=None, stop=None, routed=None):
    return SimpleNamespace(index=index, token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish,
                           stop_reason=stop, routed_experts=routed)


def test_convert_vllm_deltas():
    from server.engine.request import EngineRequest

    eng = fake_engine()
    req = EngineRequest("r", [5, 6, 7], SamplingParams(max_tokens=2, logprobs=1, prompt_logprobs=0))
    state = StreamState(req)
    plps = [None, {6: lp(-1.5, 3)}, {7: lp(-0.5, 1)}]
    first = eng._convert(vout([comp(0, [9], "a", [{9: lp(-0.1, 1)}])], prompt_logprobs=plps), state,
                         req.sampling_params)
    assert first.prompt_token_ids == [5, 6, 7] and first.prompt_logprobs[0] is None
    assert [(x.token_id, x.logprob, x.top) for x in first.prompt_logprobs[1:]] == [(6, -1.5, []), (7, -0.5, [])]
    assert first.outputs[0].token_ids == [9] and first.outputs[0].logprobs[0].top == [(9, -0.1)]
    assert eng._convert(vout([comp(0, [], "")]), state, req.sampling_params) is None  # nothing new
    last = eng._convert(vout([comp(0, [4], "b", [{4: lp(-2.0, 2), 9: lp(-0.3, 1)}], "length")], finished=True),
                        state, req.sampling_params)
    assert last.finished and last.prompt_token_ids is None and last.outputs[0].finish_reason == "length"
    assert last.metrics.num_generation_tokens == 2 and last.metrics.expert_counts is None


def test_convert_routed_experts_into_usage_and_routing_stats():
    np = pytest.importorskip("numpy")
    from server.engine.request import EngineRequest

    eng = fake_engine(routing_enabled=True)
    rec = Recorder()
    eng._loggers.append(rec)
    req = EngineRequest("r", [5, 6], SamplingParams(max_tokens=1))
    routed = np.array([[[0, 1], [2, 3]], [[0, 2], [3, 3]], [[1, 1], [0, 0]]])  # prompt 2 + 1 generated
    out = eng._convert(vout([comp(0, [9], "a", finish="length", routed=routed)], finished=True), StreamState(req),
                       req.sampling_params)
    assert out.metrics.expert_counts == [[2, 3, 1, 0], [2, 0, 1, 3]]
    assert out.metrics.device_expert_tokens == {"cuda": 12}
    assert rec.calls and rec.calls[-1][2].expert_tokens == [[2, 3, 1, 0], [2, 0, 1, 3]]  # delivered: now idle


@pytest.mark.parametrize("extra", ['{"distributed_executor_backend": "ray"}', '{"data_parallel_backend": "ray"}'])
def test_ray_on_the_cpu_build_is_refused_at_startup(extra):
    """vLLM 0.32's CPU platform has no Ray device key: its Ray executor raises "current platform cpu
    does not support ray" and Ray DP finds no devices (run by tests/vllm/test_multinode.py's
    notes); refused here with the reason, before any process starts."""
    with pytest.raises(ConfigError, match="vLLM's CPU backend cannot run on Ray"):
        kwargs(on_cpu=True, env={EXTRA_ARGS_ENV: extra}, tensor_parallel_size=2)
    assert kwargs(on_cpu=False, env={EXTRA_ARGS_ENV: extra})[extra.split('"')[1]] == "ray"  # GPUs: passed on


def test_the_otlp_endpoint_is_passed_to_vllm():
    assert kwargs(otlp_traces_endpoint="http://collector:4317")["otlp_traces_endpoint"] == "http://collector:4317"
    assert "otlp_traces_endpoint" not in kwargs()
