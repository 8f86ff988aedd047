"""Expert-placement simulator: replay routing counts on K virtual devices and compare placement policies.

    python -m loadtest placement-sim --trace routing.jsonl --devices 4
    python -m loadtest placement-sim --synthetic zipf:1.2 --devices 8 --experts 64 --layers 8 \
        --redundant 8 --model path/to/Mixtral-8x7B   # expert bytes and hidden size from its config

Input: a routing trace written by `moe-serve --record-routing PATH` (server/engine/native/placement/trace.py
format) or a synthetic trace: per layer, expert popularity ~ 1/rank^s under a random
permutation (`zipf:S`; `uniform`), each token picks top_k distinct experts by that popularity;
`--drift N` reshuffles the popularity every N steps (shifting hot spots).

Per policy (contiguous, round_robin, balanced, balanced+R replicas) it reports:
- balancedness: per step, mean device load / max device load, token-weighted over steps and
  averaged over layers (the max device bounds the step time); and on the whole-trace totals;
- replicas used (redundant physical experts over all layers, at the end);
- expert memory per device (max over devices, all MoE layers);
- cross-device traffic: token-expert pairs computed away from the first device (where the
  tokens live), as a share and in bytes (activation out and back, `--act-bytes` per value);
  an upper bound for a dispatcher that sends a token once per device;
- expert copies moved by online rebalancing (`--rebalance-interval N`).
Plans are made on the whole trace's loads (an oracle) unless `--rebalance-interval N` is set:
then balanced policies start from no statistics and re-plan every N steps on the last window,
as the server does. A replicated expert's pairs are split evenly over its replicas (the
executor gives each floor or ceil of that, the extra pair rotating with the batch), so device
loads here are expectations. Prints a markdown table and writes a JSON result (a simulation:
no timing).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from loadtest import output, results
from models.placement.plan import Placement
from models.placement.planner import default_capacity, place
from server.engine.native.placement.manager import MIN_GAIN
from server.engine.native.placement.trace import RoutingRecorder, TraceHeader, read_trace

HEADING = "## Placement simulator"


# -- traces ---------------------------------------------------------------------------------------
def synthetic_steps(spec: str, layers: int, experts: int, top_k: int, steps: int, tokens: int, seed: int,
                    drift: int = 0) -> Iterator[np.ndarray]:
    """Per-step [layers, experts] counts of a synthetic skewed routing."""
    if top_k > experts:
        raise ValueError("top_k must be <= experts")
    if spec == "uniform":
        s = 0.0
    elif spec.startswith("zipf:"):
        s = float(spec[5:])
        if s < 0:
            raise ValueError("zipf exponent must be >= 0")
    else:
        raise ValueError(f"unknown synthetic trace {spec!r}; use zipf:S or uniform")
    rng = np.random.default_rng(seed)
    base = np.log(1.0 / np.arange(1, experts + 1) ** s)  # [E] log popularity by rank

    def shuffle() -> np.ndarray:
        return np.stack([base[rng.permutation(experts)] for _ in range(layers)])  # [L, E]

    logp = shuffle()
    for step in range(steps):
        if drift and step and step % drift == 0:
            logp = shuffle()
        g = logp[None] + rng.gumbel(size=(tokens, layers, experts))  # [T, L, E]
        chosen = np.argpartition(-g, top_k - 1, axis=-1)[..., :top_k]  # [T, L, k] distinct experts
        flat = (chosen + np.arange(layers)[None, :, None] * experts).reshape(-1)
        yield np.bincount(flat, minlength=layers * experts).reshape(layers, experts)


# -- evaluation ---------------------------------------------------------------------------------
class _Layout:
    """A placement flattened for fast exact per-step device loads."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.devices = placement.all_devices
        index = {d: i for i, d in enumerate(self.devices)}
        self.layers = []
        for layer in placement.layers:
            logical = np.array([p.logical for p in layer.physical])
            n = np.array([layer.num_replicas(p.logical) for p in layer.physical])
            dev = np.array([index[p.device] for p in layer.physical])
            self.layers.append((logical, n, dev))

    def device_counts(self, counts: np.ndarray) -> np.ndarray:
        """[L, E] step counts -> [L, num_devices] expected pairs per device (c / replicas each)."""
        out = np.zeros((len(self.layers), len(self.devices)))
        for li, (logical, n, dev) in enumerate(self.layers):
            per = counts[li, logical] / n  # [P] pairs per physical expert
            out[li] = np.bincount(dev, weights=per, minlength=len(self.devices))
        return out


@dataclass
class Result:
    policy: str
    balancedness_step: float
    balancedness_total: float
    replicas: int
    max_expert_bytes: int
    cross_pairs: float
    total_pairs: int
    traffic_bytes: float
    moved: int
    rebalances: int


def evaluate(name: str, policy: str, redundant: int, steps: Callable[[], Iterator[np.ndarray]], num_steps: int | None,
             devices: list[str], capacity: list[int], oracle: np.ndarray | None, interval: int,
             expert_bytes: int, hidden: int, act_bytes: int, progress: bool = True, min_gain: float = 0.02) -> Result:
    layers, experts = None, None
    layout = None
    sum_mean = sum_max = 0.0
    totals = None
    cross = total = moved = rebalances = 0
    window = None
    since = 0
    for counts in tqdm(steps(), total=num_steps, desc=name, unit="step", disable=not progress, leave=False):
        if layout is None:
            layers, experts = counts.shape
            start = oracle if (oracle is not None and not (interval and policy == "balanced")) \
                else np.zeros((layers, experts))
            layout = _Layout(place(policy, start, devices, capacity, redundant))
            totals = np.zeros((layers, len(layout.devices)))
            window = np.zeros((layers, experts))
        per_dev = layout.device_counts(counts)  # [L, D]
        compute = per_dev[:, : len(devices)]
        sum_mean += compute.mean(axis=1).sum()
        sum_max += compute.max(axis=1).sum()
        totals += per_dev
        total += int(counts.sum())
        cross += float(per_dev[:, 1:].sum())
        if interval and policy == "balanced":
            window += counts
            since += 1
            if since >= interval:
                new = place("balanced", window, devices, capacity, redundant, previous=layout.placement)
                if new.balancedness(window) > layout.placement.balancedness(window) + min_gain:
                    moved += new.moved_experts(layout.placement)
                    rebalances += 1
                    layout = _Layout(new)
                window[:] = 0
                since = 0
    if layout is None:
        raise ValueError("the trace has no steps")
    per_layer_total = [t.mean() / t.max() if t.max() > 0 else 1.0 for t in totals[:, : len(devices)]]
    slots = layout.placement.slots_per_device()
    return Result(name, sum_mean / sum_max if sum_max > 0 else 1.0, float(np.mean(per_layer_total)),
                  layout.placement.num_replicas_used, max(sum(v) for d, v in slots.items()) * expert_bytes,
                  cross, total, 2.0 * cross * hidden * act_bytes, moved, rebalances)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def table(results_: list[Result], interval: int) -> str:
    head = ("| policy | balancedness (per step) | balancedness (trace total) | replicas | "
            "expert memory / device | cross-device pairs | traffic |" + (" moved / rebalances |" if interval else ""))
    sep = "|" + "---|" * (7 + (1 if interval else 0))
    rows = [head, sep]
    for r in results_:
        share = r.cross_pairs / r.total_pairs if r.total_pairs else 0.0
        row = (f"| {r.policy} | {r.balancedness_step:.3f} | {r.balancedness_total:.3f} | {r.replicas} | "
               f"{_fmt_bytes(r.max_expert_bytes)} | {share:.1%} | {_fmt_bytes(r.traffic_bytes)} |")
        if interval:
            row += f" {r.moved} / {r.rebalances} |" if r.policy.startswith("balanced") else " - |"
        rows.append(row)
    return "\n".join(rows)


# -- CLI ----------------------------------------------------------------------------------------
def _model_sizes(path: str) -> tuple[int, int]:
    from models.hf_config import load_config

    cfg = load_config(path)
    wbytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(cfg.torch_dtype, 2)
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * wbytes, cfg.hidden_size


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtest placement-sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="routing trace (JSON lines) from --record-routing")
    src.add_argument("--synthetic", help="zipf:S or uniform")
    ap.add_argument("--devices", type=int, default=4, help="virtual devices K")
    ap.add_argument("--redundant", type=int, default=None, help="replicas per layer for balanced+R (default: K)")
    ap.add_argument("--capacity", type=int, default=None, help="expert slots per device per layer (default: equal)")
    ap.add_argument("--rebalance-interval", type=int, default=0, help="re-plan every N steps (0: oracle plans)")
    ap.add_argument("--min-gain", type=float, default=MIN_GAIN,
                    help="move weights only when balancedness on the window rises by this much (as the server)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step (synthetic)")
    ap.add_argument("--drift", type=int, default=0, help="reshuffle expert popularity every N steps (synthetic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-trace", help="also write the synthetic trace here")
    ap.add_argument("--model", help="model directory: expert bytes and hidden size from its config.json")
    ap.add_argument("--expert-bytes", type=int, default=None, help="bytes of one expert (w1+w3+w2)")
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--act-bytes", type=int, default=2, help="bytes per activation value on the wire")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def simulate(argv: list[str] | None = None) -> tuple[str, list[Result]]:
    """Parse the flags, replay, print the table; returns (the table's caption, the results)."""
    ap = parser()
    args = ap.parse_args(argv)
    if args.devices < 1:
        ap.error("--devices must be >= 1")

    expert_bytes, hidden = args.expert_bytes, args.hidden_size
    if args.model:
        mb, mh = _model_sizes(args.model)
        expert_bytes, hidden = expert_bytes or mb, hidden or mh
    if args.trace:
        header, _ = read_trace(args.trace)
        steps = lambda: read_trace(args.trace)[1]
        num_steps = None
        expert_bytes = expert_bytes or header.expert_bytes
        hidden = hidden or header.hidden_size
        experts = header.num_experts
    else:
        gen = {"spec": args.synthetic, "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
               "steps": args.steps, "tokens": args.tokens, "seed": args.seed, "drift": args.drift}
        cached = list(tqdm(synthetic_steps(**gen), total=args.steps, desc="synthetic", unit="step",
                           disable=args.no_progress, leave=False))  # [L, E] ints per step: small
        steps = lambda: iter(cached)
        num_steps = args.steps
        experts = args.experts
    expert_bytes = expert_bytes or 3 * 4096 * 14336 * 2  # Mixtral-8x7B bf16 when nothing says otherwise
    hidden = hidden or 4096
    if args.synthetic and args.save_trace:
        rec = RoutingRecorder(args.save_trace, TraceHeader(args.layers, experts, args.top_k, hidden,
                                                           expert_bytes, list(range(args.layers))))
        for c in steps():
            rec.record(c)
        rec.close()
    K = args.devices
    R = K if args.redundant is None else args.redundant
    devices = [f"dev{i}" for i in range(K)]
    progress = not args.no_progress

    # whole-trace loads: the plan of every policy, except balanced ones in online mode
    oracle = sum(tqdm(steps(), total=num_steps, desc="totals", unit="step", disable=not progress,
                      leave=False)).astype(np.float64)
    runs = [("contiguous", "contiguous", 0), ("round_robin", "round_robin", 0), ("balanced", "balanced", 0)]
    if R:
        runs.append((f"balanced+{R}", "balanced", R))
    out = []
    for name, policy, red in runs:
        cap = [args.capacity] * K if args.capacity else default_capacity(experts, red, K)
        out.append(evaluate(name, policy, red, steps, num_steps, devices, cap, oracle, args.rebalance_interval,
                                expert_bytes, hidden, args.act_bytes, progress, args.min_gain))
    mode = (f"online, re-planned every {args.rebalance_interval} steps on the last window"
            if args.rebalance_interval else "plans from the whole trace's loads")
    caption = (f"{K} devices, {experts} experts, {'trace ' + args.trace if args.trace else args.synthetic}; {mode}; "
               f"expert {_fmt_bytes(expert_bytes)}, hidden {hidden}")
    print(caption + "\n")
    print(table(out, args.rebalance_interval))
    return caption, out


def main(argv: list[str] | None = None) -> dict:
    ap = parser()
    output.add_args(ap)
    args = ap.parse_args(argv)
    sim_argv = [a for a in (argv or []) if a not in ("--doc",)]
    for flag in ("--json", "--note"):  # the result's own flags are not the simulator's
        if flag in sim_argv:
            i = sim_argv.index(flag)
            del sim_argv[i:i + 2]
    caption, res = simulate(sim_argv)
    result = results.new_result("placement-sim", argv, vars(args), heading=HEADING)
    result["measurements"] = {"caption": caption, "results": [dataclasses.asdict(r) for r in res]}
    result["summary"]["blocks"] = [results.text(caption), results.text(table(res, args.rebalance_interval)),
                                   {"kind": "note"}]
    output.finish(result, args)
    return result
