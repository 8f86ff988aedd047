"""moe-serve's benchmarks and load tools: `python -m loadtest --help` lists them.

- `python -m loadtest <benchmark> [args]`: one benchmark (loadtest/benches/), timed by
  loadtest/harness.py, its result written as JSON (loadtest/results.py);
- `python -m loadtest docs RESULT.json`: the result's section of docs/benchmarks.md (loadtest/docs.py);
- `python -m loadtest.loadgen`: the load generator for any OpenAI-compatible server;
- loadtest/checkpoints.py: the random-weight benchmark checkpoints.
"""
