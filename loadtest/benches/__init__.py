"""The benchmarks `python -m loadtest <name>` runs: name -> module (each has `main(argv)`; the
first line of its docstring is its line in `python -m loadtest --help`)."""

BENCHES = {
    "moe-block": "loadtest.benches.moe_block",
    "cpu-kernels": "loadtest.benches.cpu_kernels",
    "decode-step": "loadtest.benches.decode_step",
    "engine": "loadtest.benches.engine",
    "serving": "loadtest.benches.serving",
    "structured": "loadtest.benches.structured",
    "grammar-backends": "loadtest.benches.grammar_backends",
    "schema-compile": "loadtest.benches.schema_compile",
    "grammar-attacks": "loadtest.benches.grammar_attacks",
    "big-answer": "loadtest.benches.big_answer",
    "gpu": "loadtest.benches.gpu",
    "placement-sim": "loadtest.benches.placement_sim",
    "placement-report": "loadtest.benches.placement_report",
    "hybrid-decode": "loadtest.benches.hybrid_decode",
    "family-decode": "loadtest.benches.family_decode",
    "spec-decode": "loadtest.benches.spec_decode",
    "mla-decode": "loadtest.benches.mla_decode",
    "quant-quality": "loadtest.benches.quant_quality",
    "quant-decode": "loadtest.benches.quant_decode",
    "kv-fp8-quality": "loadtest.benches.kv_fp8_quality",
    "cpu-tier": "loadtest.benches.cpu_tier",
    "async-scheduling": "loadtest.benches.async_sched",
    "llamacpp": "loadtest.benches.llamacpp_side",
}
