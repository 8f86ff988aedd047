"""A load generator for OpenAI-compatible inference servers (moe-serve, vLLM, anything that
streams `/v1/completions` or `/v1/chat/completions` as server-sent events).

    python -m loadtest.loadgen --url http://127.0.0.1:8000 --model NAME --profile concurrency \\
        --concurrency 16 --num-requests 64 --prompt-len 128 --output-len 128 --out results/x

Profiles: fixed concurrency (N clients back to back), fixed request rate (Poisson arrivals from
a seed), and sweeps over a list of rates or concurrencies. Prompts are random token-id lists
(exact lengths whatever the tokenizer) or text; output lengths are pinned with `max_tokens` and
`ignore_eos: true`. Every request streams, so each one yields TTFT, per-chunk inter-token
latency and end-to-end latency; a point reports their p50/p90/p95/p99, request and output-token
throughput, goodput under an SLO, and errors by kind (HTTP status, timeout, connection, stream).
Results: JSON (with every request), a markdown table and a matplotlib chart.

Why our own (asyncio + httpx; the client, runner and stats are ~500 lines) rather than an existing tool:
- guidellm measures the same things but pulls in a large dependency tree (`transformers`,
  `datasets`, `pydantic-settings`, `rich`, `click`, `loguru`, ...) for what is one HTTP loop here;
  its CLI and JSON report change between releases, and our docs, soak tests and the vLLM
  comparison need a stable, scriptable API they can import (`run`, `send`, `summarize`).
- locust is built for request/response web load: a request is one timing, so TTFT and
  per-token gaps of a stream need custom event plumbing, and its gevent workers do not mix
  with the asyncio test code; open-loop Poisson arrivals are not its model (it runs users).
- vLLM's `vllm bench serve` is the closest match (its percentiles and TTFT/ITL definitions
  are what we follow), but it lives inside vLLM: it would tie our benchmark client to one peer's
  install (and its CPU build's entry point is broken here).
Own code also lets tests drive faults (client aborts mid-stream) with the same client.

Modules: `dists` (length distributions), `workload` (seeded prompts), `client` (one streamed
request, timed), `runner` (profiles, bounds), `stats` (percentiles, goodput), `report` (JSON,
markdown, PNG), `__main__` (CLI); for benchmarks and tests: `procs` (start/stop a server
process), `sysinfo` (machine facts, CPU sampling); `python -m loadtest serving` builds on them.

Safety: the generator only ever talks to the one base URL it is given (default loopback),
ignores proxy environment variables, and every run is bounded in requests and in time.
"""

from loadtest.loadgen.client import RequestResult, send
from loadtest.loadgen.dists import LengthDist
from loadtest.loadgen.runner import LoadPoint, RunConfig, run, run_point
from loadtest.loadgen.stats import SLO, summarize
from loadtest.loadgen.workload import RequestSpec, build_workload

__all__ = [
           "SLO",
           "LengthDist",
           "LoadPoint",
           "RequestResult",
           "RequestSpec",
           "RunConfig",
           "build_workload",
           "run",
           "run_point",
           "send",
           "summarize",
]
