"""Structured outputs for the native engine: grammar compilation (cached, API side), per-sequence
matchers and batched token masks (engine side). See docs/architecture.md, "Structured outputs".

Modules: spec (what a request asks, normalised), backend (xgrammar compiler), cache (compiled
grammars per spec), state (per-sequence matcher), mask (batched bitmask fill and apply),
runtime (the calls EngineCore makes).
"""
