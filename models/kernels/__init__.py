"""Kernels for the hot paths, each with a pure-PyTorch reference the tests compare against.

- `plan`: the kernel plan, where a (device, dtype, model config, flags) becomes each layer's
  kernels, once, at load (`flags`: the user's choices);
- `fused_moe`: the experts of an MoE layer (Triton grouped GEMM, `torch._grouped_mm`, the C
  kernel, the per-expert loop with the family variants, the reference);
- `paged_attention`: decode attention reading the KV blocks in place (Triton, C, reference);
- `packed`: CPU weights kept in a kernel's packed layout (C panels, oneDNN);
- `cpu_ops` / `cpu_build`: the C kernels of `csrc/` as `torch.ops.moe_serve.*` operators, built
  on first use; `triton_moe`, `triton_attention`, `triton_ops` (RMSNorm, rotary + KV store): the
  Triton kernels, registered as `torch.ops.moe_serve.*` operators too;
- `moe_align`: sorting token-expert pairs by expert; `reference`: the PyTorch references.
"""
