"""The llama.cpp benchmark peer (loadtest/peers/llamacpp.py, loadtest/benches/llamacpp_*.py).

Default suite: the pure parts (command lines, output parsers, the tokenizer check, the KV
arithmetic against a real cache, the streamed random checkpoint writer on a small shape loaded
by the native engine). Marker `llamacpp` (`pytest -m llamacpp`, a CI group after
scripts/build_llamacpp.sh): the real binaries on the bundled model.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from loadtest.benches import llamacpp_side as side
from loadtest.peers import llamacpp as L
from tests.conftest import BUNDLED, skip_or_fail


def test_commands_carry_the_benchmark_settings(tmp_path: Path) -> None:
    b = L.bench_command("m.gguf", threads=2, reps=3, n_prompt=512, n_gen=128, home=tmp_path)
    assert b[0] == str(tmp_path / "build" / "bin" / "llama-bench")
    assert " ".join(b[1:]) == "-m m.gguf -t 2 -r 3 -p 512 -n 128 -o json"
    s = L.server_command("m.gguf", 8123, parallel=16, threads=2, ctx_per_slot=640, alias="x", home=tmp_path)
    joined = " ".join(s)
    for part in ("-np 16", "-c 10240", "-t 2", "-tb 2", "--cont-batching", "--port 8123", "--alias x"):
        assert part in joined, part
    p = L.perplexity_command("m.gguf", "t.txt", ctx=256, threads=2, logits_file="d.bin", home=tmp_path)
    assert p[p.index("-c") + 1] == "256" and p[p.index("-b") + 1] == "256"
    assert p[-2:] == ["--kl-divergence-base", "d.bin"]
    assert L.quantize_command("a.gguf", "b.gguf", "Q4_0", 2, home=tmp_path)[1:] == ["a.gguf", "b.gguf", "Q4_0", "2"]
    c = L.convert_command("ckpt", "out.gguf", "f16", python="py", home=tmp_path)
    assert c[0] == "py" and c[3:] == [str(L.src_dir(tmp_path)), "ckpt", "--outfile", "out.gguf", "--outtype", "f16"]
    assert L.convert_env(tmp_path)["PYTHONPATH"].split(":") == [str(L.src_dir(tmp_path)),
                                                                str(L.src_dir(tmp_path) / "gguf-py")]


def test_parse_version() -> None:
    text = "load_backend: x\nversion: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
    assert L.parse_version(text) == "0.5.0-dev, commit 0c1e570"
    assert L.parse_version("version: 4567 (abcdef0)") == "b4567, commit abcdef0"
    assert L.parse_version("no version here") is None


def test_moe_serve_runs_the_matching_bits() -> None:
    assert side.moe_serve_pair("F16", "bfloat16") == ("bfloat16", None)
    assert side.moe_serve_pair("F16", "float32") == ("float32", None)
    assert side.moe_serve_pair("Q8_0", "bfloat16") == ("float32", "int8")
    assert side.moe_serve_pair("Q4_0", "bfloat16") == ("float32", "int4")
    with pytest.raises(ValueError, match="Q5_K"):
        side.moe_serve_pair("Q5_K", "bfloat16")
    cmd = side.moe_serve_command("/m", 9000, dtype="float32", quantization="int4", max_model_len=640,
                                 max_num_seqs=16, num_kv_blocks=640)
    joined = " ".join(cmd)
    assert "-m server.cli" in joined and "--quantization int4" in joined and "--num-kv-blocks 640" in joined
    assert "--quantization" not in side.moe_serve_command("/m", 1, dtype="bfloat16", quantization=None,
                                                          max_model_len=8, max_num_seqs=1, num_kv_blocks=1)


def test_parse_bench_reads_llama_bench_json() -> None:
    rng = random.Random(0)
    pp, tg = [rng.uniform(10, 500) for _ in range(3)], [rng.uniform(1, 50) for _ in range(3)]
    rows = [{"build_commit": "abc", "n_threads": 2, "n_prompt": 512, "n_gen": 0, "avg_ts": sum(pp) / 3,
             "stddev_ts": float(np.std(pp)), "samples_ts": pp},
            {"build_commit": "abc", "n_threads": 2, "n_prompt": 0, "n_gen": 128, "avg_ts": sum(tg) / 3,
             "stddev_ts": float(np.std(tg)), "samples_ts": tg}]
    got = L.parse_bench("warming up\n" + json.dumps(rows, indent=2) + "\n")
    assert set(got) == {"pp512", "tg128"}
    assert got["pp512"]["tok_s"] == pytest.approx(sum(pp) / 3) and got["tg128"]["samples_ts"] == tg
    assert got["tg128"]["threads"] == 2
    with pytest.raises(ValueError):
        L.parse_bench("error: failed to load model")


def test_parse_perplexity_and_token_dump(tmp_path: Path) -> None:
    ppl, err = random.uniform(5, 200), random.uniform(0.1, 3)
    log = (f"perplexity: calculating perplexity over 37 chunks, n_ctx=256, batch_size=256, n_seq=1\n"
           f"[1]12.3,[2]11.9,\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}\n")
    got = L.parse_perplexity(log)
    assert got["perplexity"] == pytest.approx(ppl, abs=1e-4) and got["chunks"] == 37 and got["ctx"] == 256
    with pytest.raises(ValueError):
        L.parse_perplexity("main: error: failed to load model")
    ids = np.random.default_rng(0).integers(0, 4096, 3 * 16).astype(np.int32)
    dump = tmp_path / "d.bin"
    dump.write_bytes(b"_logits_" + np.array([16, 4096, 3], dtype=np.int32).tobytes() + ids.tobytes()
                     + b"\x00" * 64)  # the logits that follow are not read
    assert L.read_logits_tokens(dump) == (16, 3, ids.tolist())
    dump.write_bytes(b"notlogit" + bytes(12))
    with pytest.raises(ValueError):
        L.read_logits_tokens(dump)


def test_gpt2_pre_tokenizer_only_for_byte_level_bpe() -> None:
    tj = json.loads((BUNDLED / "tokenizer.json").read_text())
    assert L.byte_level_gpt2(tj)
    assert not L.byte_level_gpt2(tj | {"pre_tokenizer": {"type": "Metaspace", "replacement": "_"}})
    assert not L.byte_level_gpt2(tj | {"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}})
    assert not L.byte_level_gpt2(tj | {"model": {"type": "WordPiece"}})
    seq = {"type": "Sequence", "pretokenizers": [tj["pre_tokenizer"], {"type": "Digits"}]}
    assert not L.byte_level_gpt2(tj | {"pre_tokenizer": seq})


def test_kv_bytes_equal_the_engines_cache() -> None:
    from models import load_model

    model = load_model(str(BUNDLED), dtype="float32", progress=False)
    blocks, block = 5, 16
    caches = model.allocate_kv_cache(blocks, block)
    got = sum(t.numel() * t.element_size() for c in caches for t in (c if isinstance(c, (list, tuple)) else [c]))
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert L.kv_bytes(cfg, blocks * block, 4) == got


def test_streamed_random_checkpoint_loads_and_runs(tmp_path: Path) -> None:
    import torch
    import transformers
    from safetensors import safe_open

    from loadtest.checkpoints import mixtral_tensors, write_random_safetensors
    from models import load_model

    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    hf = transformers.MixtralConfig(**cfg, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    transformers.MixtralForCausalLM(hf).save_pretrained(str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    tensors = mixtral_tensors(cfg)
    assert dict(tensors) == expected  # the names and shapes transformers' Mixtral saves
    hf.save_pretrained(str(tmp_path))  # as make_streamed_checkpoint writes it
    n = write_random_safetensors(tmp_path / "model.safetensors", tensors, seed=1, progress=False)
    assert n == sum(math.prod(s) for _, s in tensors) and not (tmp_path / "model.safetensors.part").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == expected
        assert f.get_tensor("model.norm.weight").eq(1).all()
        w = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight")
        assert w.dtype == torch.bfloat16 and 0.015 < w.float().std().item() < 0.025
    model = load_model(str(tmp_path), dtype="float32", progress=False)
    from loadtest.benches.quant_quality import cross_entropy

    ce, count = cross_entropy(model, [torch.randint(3, 300, (13,))])
    assert count == 12 and math.isfinite(ce) and ce > 0


# ---------------------------------------------------------------- the real peer (pytest -m llamacpp)

@pytest.mark.llamacpp
def test_real_llamacpp_on_the_bundled_model(tmp_path: Path) -> None:
    """Convert, quantize, llama-bench, llama-perplexity (token dump = HF ids), llama-server over HTTP."""
    if not L.built():
        skip_or_fail(f"llama.cpp is not built in {L.HOME} (bash scripts/build_llamacpp.sh)")
    files = L.gguf_files(BUNDLED, tmp_path, ("F16", "Q4_0"))
    f16, q4 = L.gguf_info(files["F16"]), L.gguf_info(files["Q4_0"])
    assert f16["pre"] == "gpt-2" and f16["add_bos"] is True and f16["arch"] == "llama"
    assert q4["weight_bytes"] < 0.5 * f16["weight_bytes"]
    bench = L.run_bench(files["Q4_0"], threads=2, reps=1, n_prompt=32, n_gen=8, timeout=300)
    assert set(bench) == {"pp32", "tg8"} and all(v["tok_s"] > 0 for v in bench.values())

    from loadtest.benches import llamacpp_ppl

    text, tok = llamacpp_ppl.held_out_text(BUNDLED)
    (tmp_path / "t.txt").write_text(text[:8000])
    out = L.run_perplexity(files["F16"], tmp_path / "t.txt", ctx=64, threads=2, timeout=300)
    n_ctx, n_chunk, ids = L.perplexity_tokens(files["F16"], tmp_path / "t.txt", tmp_path / "d.bin", ctx=64,
                                              threads=2, timeout=300)
    assert n_ctx == 64 and n_chunk == out["chunks"] > 2 and 1 < out["perplexity"] < 4096
    assert llamacpp_ppl.hf_ids(tok, text[:8000], True)[:len(ids)] == ids  # one tokenization for both engines

    from loadtest.loadgen.procs import ManagedServer

    port = side.free_port()
    srv = ManagedServer(L.server_command(files["Q4_0"], port, parallel=2, threads=2, ctx_per_slot=128,
                                         alias=side.SERVED), log_path=tmp_path / "server.log", port=port,
                        ready_path="/health")
    try:
        srv.start().wait_ready(120)
        assert (L.rss_kib(srv.pid)["VmRSS"] or 0) * 1024 > q4["weight_bytes"]
        r = asyncio.run(side._probe(srv.url, 16, 8, (3, 4000), "t"))
        assert r.ok and r.output_tokens == 8 and r.tpot and r.tpot > 0, (r.error, srv.log_tail())
    finally:
        srv.stop()

    from loadtest.benches import llamacpp_decode_ab

    out = tmp_path / "ab.json"
    assert llamacpp_decode_ab.main(["--model", str(BUNDLED), "--formats", "Q4_0", "--rounds", "2", "--tokens", "4",
                                    "--gguf-dir", str(tmp_path), "--json", str(out)]) == 0
    m = json.loads(out.read_text())["measurements"]["Q4_0"]
    assert m["quantization"] == "int4" and len(m["ratios"]) == 2 and all(x > 0 for x in m["moe_serve_ms"])
    assert m["ratios"] == [a / b for a, b in zip(m["llamacpp_ms"], m["moe_serve_ms"])]


def test_summary_blocks_render_pairs_and_ratios() -> None:
    from loadtest import docs, results

    rng = random.Random(1)
    argv = ["--formats", "Q4_0"]
    res = results.new_result("llamacpp", argv, {"prefill_len": 512, "decode_len": 128, "concurrency": [1, 16],
                                                "threads": 2, "parallel": 16, "ctx": 640, "runs": 3},
                             heading="### llama.cpp side by side, speed and memory: t", section="llamacpp-t")
    speed = {k: rng.uniform(1, 100) for k in ("pf_l", "dec_l", "c1_l", "c16_l", "pf_m", "dec_m", "c1_m", "c16_m")}

    def server(pf: float, dec: float, c1: float, c16: float, rss_gib: float) -> dict:
        return {"probes": {"prefill_tok_s": pf, "decode_tok_s": dec}, "rss_after_load_kib": {"VmRSS": int(rss_gib * 2**20)},
                "serving": {"1": {"output_tok_s": c1}, "16": {"output_tok_s": c16}}, "argv": ["x"]}

    res["measurements"] = {
        "config": {"hidden_size": 8, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                   "num_hidden_layers": 2, "vocab_size": 100},
        "formats": {"Q4_0": {
            "gguf_weight_bytes": 2**30, "llama_kv_bytes": 2**29, "moe_serve_kv_bytes": 2**30,
            "llama_bench": {"pp512": {"tok_s": 50.0, "stddev": 1.0}, "tg128": {"tok_s": 10.0, "stddev": 0.5}},
            "llama_server": server(speed["pf_l"], speed["dec_l"], speed["c1_l"], speed["c16_l"], 2.0),
            "moe_serve": server(speed["pf_m"], speed["dec_m"], speed["c1_m"], speed["c16_m"], 3.0)
            | {"dtype": "float32", "quantization": "int4", "kernel_plan": {"weight_bytes": 2**31}}}}}
    res["summary"]["blocks"] = side.summary_blocks(res, "t")
    assert results.validate(res) == []
    rows = res["summary"]["blocks"][1]["rows"]
    assert [r[0] for r in rows] == ["llama.cpp Q4_0", "moe-serve int4"]
    assert rows[0][4] == pytest.approx(2.0 / 1.5) and rows[1][4] == pytest.approx(1.0)  # RSS / (weights + KV)
    assert rows[0][9] == "pp512 50.0, tg128 10.0"
    ratio = res["summary"]["blocks"][2]["rows"][0]
    assert ratio[1] == pytest.approx(speed["pf_m"] / speed["pf_l"]) and ratio[4] == pytest.approx(speed["c16_m"] / speed["c16_l"])
    assert f"decode vs tg128 {speed['dec_m'] / 10.0:.2f}x" in ratio[5]
    assert "| moe-serve int4 |" in docs.render_block(res)
