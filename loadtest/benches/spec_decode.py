"""Speculative decoding (n-gram) on the bundled model: decode tok/s with and without, acceptance per position.

    python -m loadtest spec-decode [--k 4] [--max-tokens 128] [--rounds 3] [--prompts 4]
        [--concurrency 16] [--disable-by-batch-size 8] [--model DIR] [--dtype auto]

Part 1, batch 1, copy-heavy prompts: a passage of the bundled model's training text (Python's own
documentation, `pydoc_data.topics`), then the passage's first sentence again, so that the model
repeats it: greedy decode tokens per second (the steps after the first token) without
speculation and with `{"method": "ngram", "num_speculative_tokens": k}`, each prompt once per
round, variants interleaved round by round (loadtest/harness.py), plus the acceptance rate per
draft position. Part 2, `--concurrency` requests at once on prompts whose drafts are mostly
rejected (sampled at temperature 1 from short questions): generated tokens per second without
speculation, with n-gram drafts always on, and with `disable_by_batch_size` (no drafts while
that many sequences run).

`--method mtp` (default model: the bundled tiny-deepseek-mtp, whose MTP layer drafts): part 1 only,
on ordinary prompts (the first 16 tokens of training passages, continued greedily), plain vs
`{"method": "mtp", "num_speculative_tokens": k}`, with the acceptance rate per draft position.
`--method mtp --step-costs`: where a decode step's time goes, plain vs MTP (the thread's CPU time
per call of the target forward, the LM heads, the sampler / verify, the MTP layer, the proposer,
the scheduler; medians over rounds), and the ceiling that sets for the speedup.
"""

from __future__ import annotations

import argparse
import json
import time

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### Speculative decoding (n-gram, CPU)"
MTP_HEADING = "### Speculative decoding (MTP, CPU)"
QUESTIONS = ["What does the for statement do?", "Explain list comprehensions.", "How are exceptions raised?",
             "What is a generator?", "Describe the with statement.", "What does import do?",
             "How do classes work?", "What is a lambda?"]


def passages(tokenizer, count: int, length: int = 160) -> list[list[int]]:
    """`count` copy prompts: a training passage of ~`length` tokens, a blank line, its first 12 tokens."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics)[::7]:
        ids = tokenizer.encode(topics[key], add_special_tokens=False)
        if len(ids) < length:
            continue
        body = ids[:length]
        out.append(tokenizer.encode("", add_special_tokens=True) + body
                   + tokenizer.encode("\n\n", add_special_tokens=False) + body[:12])
        if len(out) == count:
            break
    return out


def openings(tokenizer, count: int, length: int = 16) -> list[list[int]]:
    """`count` ordinary prompts: the first `length` tokens of training passages (the model goes on)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics)[3::7]:
        ids = tokenizer.encode(topics[key], add_special_tokens=False)
        if len(ids) >= length:
            out.append(tokenizer.encode("", add_special_tokens=True) + ids[:length])
        if len(out) == count:
            break
    return out


def mtp_main(args, argv) -> dict:
    """--method mtp: batch 1, ordinary prompts, plain vs MTP drafts."""
    import torch

    from models.checkpoints.train_tiny_mtp import OUT_DIR
    from server.engine import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(OUT_DIR)
    spec = {"method": "mtp", "num_speculative_tokens": args.k}
    kw = dict(dtype=args.dtype, kv_cache_memory=256 << 20, max_num_seqs=1)
    engines = {"plain": LLM(model, **kw).core, "mtp": LLM(model, speculative_config=json.dumps(spec), **kw).core}
    prompts = openings(engines["plain"].tokenizer, args.prompts)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    acc = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * args.k}
    tallies: dict[str, list[tuple[int, float]]] = {"plain": [], "mtp": []}

    def batch1(name: str):
        def run():
            for p in prompts:
                tallies[name].append(decode_run(engines[name], [p], greedy, acc if name == "mtp" else None))
        return run

    print(f"{len(prompts)} ordinary prompts, batch 1, {args.rounds} rounds", flush=True)
    samples = interleave({n: batch1(n) for n in tallies}, rounds=args.rounds, warmup=1, number=1)
    rate = {}
    for name in tallies:
        kept = tallies[name][len(prompts):]  # the warm-up round's runs dropped
        rate[name] = sum(t for t, _ in kept) / sum(s for _, s in kept)
    per_pos = [a / max(acc["drafts"], 1) for a in acc["per_pos"]]
    speedup = rate["mtp"] / rate["plain"]
    total = acc["accepted"] / max(acc["draft_tokens"], 1)
    print(f"batch 1: plain {rate['plain']:.1f} tok/s, mtp {rate['mtp']:.1f} tok/s ({speedup:.2f}x); acceptance "
          f"{total:.0%}, per position " + " ".join(f"{x:.0%}" for x in per_pos), flush=True)
    result = results.new_result("spec-decode", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=MTP_HEADING, section=f"spec-decode-mtp-k{args.k}")
    result["measurements"] = {"batch1": {"plain_tok_s": rate["plain"], "mtp_tok_s": rate["mtp"], "speedup": speedup,
                                         "acceptance": acc, "acceptance_per_pos": per_pos,
                                         "samples": {k: v.to_json() for k, v in samples.items()}}}
    result["summary"]["blocks"] = [
        results.text(f"{model.rstrip('/').split('/')[-1]} (dtype {args.dtype}), {torch.get_num_threads()} thread(s), "
                     f"batch 1, {len(prompts)} ordinary prompts (16 tokens of training text, continued greedily for "
                     f"{args.max_tokens} tokens). Decode tokens per second: the tokens generated after the first, "
                     f"over the time of those steps; {args.rounds} interleaved rounds after a warm-up."),
        results.table(None, [results.column("variant"), results.column("tok/s", ".1f"),
                             results.column("vs plain", ".2f"), results.column("acceptance")],
                      [["plain", rate["plain"], 1.0, "-"], [f"mtp k={args.k}", rate["mtp"], speedup, f"{total:.0%}"]]),
        results.text("Acceptance per draft position (the share of drafts whose position i was accepted): "
                     + ", ".join(f"{i}: {x:.0%}" for i, x in enumerate(per_pos)) + "."),
        {"kind": "note"},
    ]
    output.finish(result, args)
    return result


# (label, class path, method): the calls `--step-costs` times, with the thread's CPU time
COST_CALLS = [
    ("step", "server.engine.native.core:EngineCore", "step"),
    ("runner", "server.engine.native.runner:ModelRunner", "execute"),
    ("target forward", "models.model:MoEForCausalLM", "forward"),
    ("LM heads", "models.model:MoEForCausalLM", "compute_logits"),
    ("sampler", "server.engine.native.runner:ModelRunner", "_sample"),
    ("verify", "server.engine.native.runner:ModelRunner", "_verify"),
    ("proposer", "server.engine.native.spec.engine:SpecDecoder", "propose"),
    ("MTP layer", "models.mtp:MultiTokenPredictor", "forward"),
    ("MTP head", "models.mtp:MultiTokenPredictor", "compute_logits"),
    ("schedule", "server.engine.native.scheduler:Scheduler", "schedule"),
    ("scheduler update", "server.engine.native.scheduler:Scheduler", "update_from_output"),
]


def mtp_costs(args, argv) -> dict:
    """--method mtp --step-costs: per-step CPU time by component, plain vs MTP, and the ceiling."""
    import importlib
    import statistics
    from collections import defaultdict

    import torch

    from models.checkpoints.train_tiny_mtp import OUT_DIR
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(OUT_DIR)
    kw = dict(dtype=args.dtype, kv_cache_memory=256 << 20, max_num_seqs=1)
    spec = {"method": "mtp", "num_speculative_tokens": args.k}
    engines = {"plain": LLM(model, **kw).core, "mtp": LLM(model, speculative_config=json.dumps(spec), **kw).core}
    prompts = openings(engines["plain"].tokenizer, args.prompts)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    spent: dict[str, float] = defaultdict(float)
    originals = []
    for label, where, name in COST_CALLS:  # wrap each timed method (restored at the end)
        mod, _, cls_name = where.partition(":")
        cls = getattr(importlib.import_module(mod), cls_name)
        fn = getattr(cls, name)
        originals.append((cls, name, fn))

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] += time.thread_time() - t0
        setattr(cls, name, timed)

    def one_round(core) -> tuple[dict[str, float], float]:
        """ms of CPU per decode step by component, tokens per decode step (prefill steps excluded)."""
        spent.clear()
        steps = toks = 0
        for p in prompts:
            core.add_request(EngineRequest(f"c{time.monotonic_ns()}", p, greedy))
            core.step()  # the prompt
            skip = dict(spent)
            while core.has_unfinished():
                outs, *_ = core.step()
                steps += 1
                toks += sum(len(c.token_ids) for o in outs for c in o.outputs)
            for key, v in skip.items():
                spent[key] -= v
        return {key: v / steps * 1e3 for key, v in spent.items()}, toks / steps

    try:
        for core in engines.values():
            one_round(core)  # warm-up
        per: dict[str, list[dict[str, float]]] = {n: [] for n in engines}
        tps: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, core in engines.items():
                ms, tps[name] = one_round(core)
                per[name].append(ms)
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    med = {n: {label: statistics.median(r.get(label, 0.0) for r in per[n]) for label, *_ in COST_CALLS} for n in per}
    for m in med.values():  # the parts, without what is timed inside them
        m["LM heads"] -= m["MTP head"]  # the MTP head calls the target's LM head
        m["proposer other"] = m["proposer"] - m["MTP layer"] - m["MTP head"]
        m["runner other"] = m["runner"] - m["target forward"] - m["LM heads"] - m["sampler"] - m["verify"]
        m["scheduler"] = m["schedule"] + m["scheduler update"]
        m["engine other"] = m["step"] - m["runner"] - m["proposer"] - m["scheduler"]
    P, S = med["plain"]["step"], med["mtp"]["step"]
    layers = engines["plain"].model.config.num_layers
    layer = med["plain"]["target forward"] / layers  # one target layer, on average
    head = med["plain"]["LM heads"]
    tau = tps["mtp"]
    floor = 1 + args.k * (layer + head) / P  # an MTP step's cost, in plain steps, at best
    ceiling = tau / floor
    measured = tau / (S / P)
    need = 1.4 * floor  # tokens per step 1.4x needs at that cost
    rows = []
    for label in ("target forward", "LM heads", "sampler", "verify", "runner other", "MTP layer", "MTP head",
                  "proposer other", "scheduler", "engine other", "step"):
        a, b = med["plain"][label], med["mtp"][label]
        rows.append([label, a, b, b / P])
    print(f"plain step {P:.3f} ms CPU, mtp step {S:.3f} ms ({S / P:.3f}x), {tau:.3f} tokens per mtp step: "
          f"{measured:.2f}x; ceiling {ceiling:.2f}x (a step at {floor:.3f} plain steps); 1.4x needs "
          f"{need:.2f} tokens per step (at most {args.k + 1})", flush=True)
    result = results.new_result("spec-decode", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=MTP_HEADING, section=f"spec-decode-mtp-costs-k{args.k}")
    result["measurements"] = {"plain_ms": med["plain"], "mtp_ms": med["mtp"], "tokens_per_step": tau,
                              "layer_ms": layer, "head_ms": head, "floor_steps": floor, "ceiling": ceiling,
                              "speedup_cpu_time": measured, "tokens_needed_for_1_4x": need,
                              "rounds": {n: per[n] for n in per}}
    result["summary"]["blocks"] = [
        results.text(f"Where a decode step's time goes, {model.rstrip('/').split('/')[-1]} (dtype {args.dtype}), "
                     f"{torch.get_num_threads()} thread(s), batch 1, {len(prompts)} ordinary prompts x "
                     f"{args.max_tokens} greedy tokens, plain vs MTP k={args.k}: CPU time of this thread per decode "
                     f"step (time.thread_time around each call, so other jobs on the machine count less), medians "
                     f"of {args.rounds} rounds after a warm-up."),
        results.table(None, [results.column("part"), results.column("plain ms", ".3f"),
                             results.column("mtp ms", ".3f"), results.column("mtp, in plain steps", ".3f")], rows),
        results.text(f"An MTP step takes {S / P:.2f} plain steps and yields {tau:.2f} tokens: {measured:.2f}x. "
                     f"Ceiling: even with every other cost gone (a verify forward of {args.k + 1} tokens as cheap "
                     f"as one token's, no Python around it), each draft needs the MTP layer, at least one target "
                     f"layer ({layer:.3f} ms: the forward over {layers} layers), and the LM head ({head:.3f} ms), so "
                     f"a step costs >= {floor:.2f} plain steps and the speedup is <= {ceiling:.2f}x at this "
                     f"acceptance. 1.4x would need {need:.2f} tokens per step"
                     + (f", more than the {args.k + 1} a step can give." if need > args.k + 1 else ".")),
        {"kind": "note"},
    ]
    output.finish(result, args)
    return result


def decode_run(core, prompts: list[list[int]], params, stats_sink: dict | None) -> tuple[int, float]:
    """Run `prompts` together to the end; returns (tokens generated after each one's first, seconds
    of the steps after every prompt had its first token)."""
    from server.engine.request import EngineRequest

    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(f"b{time.monotonic_ns()}-{i}", p, params))
    seen: dict[str, int] = {}
    t_decode = None
    while core.has_unfinished():
        outs, st, *_ = core.step()
        for o in outs:
            seen[o.request_id] = seen.get(o.request_id, 0) + sum(len(c.token_ids) for c in o.outputs)
        if t_decode is None and len(seen) == len(prompts) and all(v > 0 for v in seen.values()):
            t_decode, first = time.perf_counter(), sum(seen.values())
        if stats_sink is not None and st.spec_num_drafts:
            stats_sink["drafts"] += st.spec_num_drafts
            stats_sink["draft_tokens"] += st.spec_num_draft_tokens
            stats_sink["accepted"] += st.spec_num_accepted_tokens
            for i, a in enumerate(st.spec_accepted_per_pos):
                stats_sink["per_pos"][i] += a
    assert t_decode is not None
    return sum(seen.values()) - first, time.perf_counter() - t_decode


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest spec-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("ngram", "mtp"), default="ngram",
                    help="ngram (copy prompts, then concurrency) or mtp (ordinary prompts, batch 1)")
    ap.add_argument("--model", help="model directory (default: the bundled checkpoint; mtp: tiny-deepseek-mtp)")
    ap.add_argument("--dtype", default="float32", help="float32: the C kernels on the CPU")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="copy prompts (batch 1, one after the other)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--disable-by-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch threads (default: the engine's)")
    ap.add_argument("--step-costs", action="store_true",
                    help="mtp: where a decode step's time goes, plain vs MTP, and the speedup's ceiling")
    output.add_args(ap)
    args = ap.parse_args(argv)
    if args.method == "mtp":
        return mtp_costs(args, argv) if args.step_costs else mtp_main(args, argv)

    import torch

    from server.config import BUNDLED_MODEL
    from server.engine import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or BUNDLED_MODEL
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max}
    cut = dict(ngram, disable_by_batch_size=args.disable_by_batch_size)
    kw = dict(dtype=args.dtype, kv_cache_memory=256 << 20, max_num_seqs=max(args.concurrency, 1))
    engines = {"plain": LLM(model, **kw).core, "ngram": LLM(model, speculative_config=json.dumps(ngram), **kw).core,
               "ngram+cutoff": LLM(model, speculative_config=json.dumps(cut), **kw).core}
    tok = engines["plain"].tokenizer
    copy = passages(tok, args.prompts)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    acc = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * args.k}
    tallies: dict[str, list[tuple[int, float]]] = {"plain": [], "ngram": []}

    def batch1(name: str):
        def run():
            for p in copy:
                tallies[name].append(decode_run(engines[name], [p], greedy, acc if name == "ngram" else None))
        return run

    print(f"part 1: {len(copy)} copy prompts, batch 1, {args.rounds} rounds", flush=True)
    s1 = interleave({n: batch1(n) for n in ("plain", "ngram")}, rounds=args.rounds, warmup=1, number=1)

    def rate(name: str) -> float:
        toks = sum(t for t, _ in tallies[name])
        secs = sum(s for _, s in tallies[name])
        return toks / secs

    # the tallies include the warm-up round: drop it (the first len(copy) entries of each)
    for name in tallies:
        tallies[name] = tallies[name][len(copy):]
    plain1, ngram1 = rate("plain"), rate("ngram")
    per_pos = [a / max(acc["drafts"], 1) for a in acc["per_pos"]]
    print(f"batch 1: plain {plain1:.1f} tok/s, ngram {ngram1:.1f} tok/s ({ngram1 / plain1:.2f}x); acceptance "
          f"{acc['accepted'] / max(acc['draft_tokens'], 1):.0%}, per position "
          + " ".join(f"{x:.0%}" for x in per_pos), flush=True)

    questions = [tok.encode(q) for q in (QUESTIONS * (args.concurrency // len(QUESTIONS) + 1))[: args.concurrency]]
    sampled = SamplingParams(temperature=1.0, max_tokens=args.max_tokens // 2, ignore_eos=True, seed=1)
    tallies2: dict[str, list[tuple[int, float]]] = {n: [] for n in engines}
    acc2 = {n: {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": [0] * args.k} for n in engines}

    def batch16(name: str):
        def run():
            tallies2[name].append(decode_run(engines[name], questions, sampled, acc2[name]))
        return run

    print(f"part 2: {args.concurrency} concurrent sampled requests, {args.rounds} rounds", flush=True)
    s2 = interleave({n: batch16(n) for n in engines}, rounds=args.rounds, warmup=1, number=1)
    rates2 = {}
    for n in engines:
        kept = tallies2[n][1:]
        rates2[n] = sum(t for t, _ in kept) / sum(s for _, s in kept)
    print("concurrency: " + ", ".join(f"{n} {r:.1f} tok/s ({r / rates2['plain']:.2f}x)" for n, r in rates2.items()),
          flush=True)

    result = results.new_result("spec-decode", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING)
    result["measurements"] = {
        "batch1": {"plain_tok_s": plain1, "ngram_tok_s": ngram1, "speedup": ngram1 / plain1, "acceptance": acc,
                   "acceptance_per_pos": per_pos, "samples": {k: v.to_json() for k, v in s1.items()}},
        "concurrency": {"tok_s": rates2, "acceptance": acc2, "samples": {k: v.to_json() for k, v in s2.items()}},
    }
    rows = [["batch 1, copy prompts", "plain", plain1, 1.0, "-"],
            ["batch 1, copy prompts", f"ngram k={args.k}", ngram1, ngram1 / plain1,
             f"{acc['accepted'] / max(acc['draft_tokens'], 1):.0%}"]]
    for n, r in rates2.items():
        a = acc2[n]
        rows.append([f"{args.concurrency} concurrent, sampled", n, r, r / rates2["plain"],
                     f"{a['accepted'] / a['draft_tokens']:.0%}" if a["draft_tokens"] else "no drafts"])
    result["summary"]["blocks"] = [
        results.text(f"The bundled checkpoint ({model.rstrip('/').split('/')[-1]}, dtype {args.dtype}), "
                     f"{torch.get_num_threads()} thread(s). Decode tokens per second: the tokens generated after "
                     f"each request's first, over the time of those steps; {args.rounds} interleaved rounds after a "
                     f"warm-up. n-gram: num_speculative_tokens {args.k}, prompt_lookup_max {args.lookup_max}; "
                     f"cutoff: disable_by_batch_size {args.disable_by_batch_size}."),
        results.table(None, [results.column("workload"), results.column("variant"), results.column("tok/s", ".1f"),
                             results.column("vs plain", ".2f"), results.column("acceptance")], rows),
        results.text("Acceptance per draft position (batch 1, copy prompts): "
                     + ", ".join(f"{i}: {x:.0%}" for i, x in enumerate(per_pos)) + "."),
        {"kind": "note"},
    ]
    output.finish(result, args)
    return result
