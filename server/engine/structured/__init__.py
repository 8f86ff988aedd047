"""Structured outputs for the native engine: grammar compilation (cached, API side), per-sequence
matchers and batched token masks (engine side). See docs/architecture.md, "Structured outputs".

Modules, API side: spec (what a request asks, normalised and checked), schema_walk /
schema_limits / schema_support / schema_formats (a JSON schema's subschemas, size limits,
the keywords the backend enforces, exact formats), backend (xgrammar compiler), grammar_check
(dead ends), cache (compiled grammars per spec, by bytes), compile_pool / compile_worker
(killable compile processes), service (the cache, the pool and the requests waiting),
limits (their budgets). Engine side: state (per-sequence matcher), mask (batched bitmask fill
and apply), runtime (the calls EngineCore makes).
"""
