// The C kernels as PyTorch operators (torch.library, namespace MOE_SERVE_OPS_NS, "moe_serve" by
// default): typed schemas checked by the dispatcher, argument checks here, one C call each. They
// appear by name in torch.profiler and compile with torch.compile (their fake implementations
// are registered from Python, models/kernels/cpu_ops.py). Functional: every op returns new
// tensors. Built with the C sources into one library by models/kernels/cpu_build.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "kernels.h"

#ifndef MOE_SERVE_OPS_NS
#define MOE_SERVE_OPS_NS moe_serve
#endif

namespace {

// below this many token-expert pairs one thread reads the experts' weights as fast as several
// (docs/benchmarks.md, "CPU kernels"), and waking threads would only add their cost
constexpr int64_t kMinPairsPerThreading = 32;
// below this many multiply-adds one thread is faster than starting others
constexpr int64_t kMinMacsPerThreading = int64_t{1} << 24;

void check_f32_cpu(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

void check_rc(int rc, const char* op) {
    TORCH_CHECK(rc != 1, op, ": out of memory");
    TORCH_CHECK_INDEX(rc != 2, op, ": expert id out of range in topk_ids");
    TORCH_CHECK(rc != 3, op, ": shapes the kernel does not serve");
    TORCH_CHECK(rc != 4, op, ": the C kernels were built without AVX2 + FMA");
    TORCH_CHECK(rc == 0, op, " failed (code ", rc, ")");
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
    // q [B, H, D]; caches [NB, BS, KVH, D]; block_tables [B, W]; seq_lens [B] -> [B, H, D]
    check_f32_cpu(q, "q");
    check_f32_cpu(k_cache, "k_cache");
    check_f32_cpu(v_cache, "v_cache");
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_decode: q must be "
                "[B, H, D] and the caches [blocks, block_size, kv_heads, D] alike");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the KV cache must be contiguous");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(2);
    TORCH_CHECK(k_cache.size(3) == D && KVH > 0 && H % KVH == 0, "paged_decode: head sizes do not match");
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
                "paged_decode: block_tables [B, W] and seq_lens [B] must match q's batch");
    const at::Tensor qc = q.contiguous();
    const at::Tensor tables = block_tables.to(at::kLong).contiguous();
    const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
    at::Tensor out = at::empty_like(qc);
    const int rc = paged_decode_f32(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                    tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H,
                                    KVH, D, k_cache.size(1), tables.size(1), static_cast<float>(scale),
                                    at::get_num_threads());
    TORCH_CHECK(rc == 0, "paged_decode: could not allocate its score buffer");
    return out;
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       const at::Tensor& w13_packed, const at::Tensor& w2_packed) {
    // x [T, H]; topk_ids, topk_weights [T, k]; packed w13 [E, 2I, H], w2 [E, H, I] (moe_pack) -> [T, H]
    check_f32_cpu(x, "x");
    check_f32_cpu(w13_packed, "w13_packed");
    check_f32_cpu(w2_packed, "w2_packed");
    TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.sizes() == topk_weights.sizes() &&
                topk_ids.size(0) == x.size(0), "moe_experts: x must be [T, H], topk_ids and topk_weights [T, k]");
    TORCH_CHECK(w13_packed.dim() == 3 && w2_packed.dim() == 3 && w13_packed.size(2) == x.size(1) &&
                w2_packed.size(1) == x.size(1) && w13_packed.size(1) == 2 * w2_packed.size(2) &&
                w13_packed.size(0) == w2_packed.size(0), "moe_experts: weights must be [E, 2I, H] and [E, H, I]");
    TORCH_CHECK(w13_packed.is_contiguous() && w2_packed.is_contiguous(), "moe_experts: packed weights must be contiguous");
    const int64_t T = x.size(0), k = topk_ids.size(1), E = w13_packed.size(0), H = x.size(1), I = w2_packed.size(2);
    at::Tensor out = at::empty({T, H}, x.options());
    if (T == 0) return out;
    const at::Tensor xc = x.contiguous();
    const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
    const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
    const int threads = T * k >= kMinPairsPerThreading ? at::get_num_threads() : 1;
    check_rc(moe_fused_f32(xc.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(),
                           w13_packed.data_ptr<float>(), w2_packed.data_ptr<float>(), out.data_ptr<float>(), T, k, E,
                           H, I, threads),
             "moe_experts");
    return out;
}

std::tuple<at::Tensor, at::Tensor> moe_pack(const at::Tensor& w13, const at::Tensor& w2) {
    // w13 [E, 2I, H], w2 [E, H, I] -> the kernel's panels, same shapes (csrc/moe_cpu.c)
    check_f32_cpu(w13, "w13");
    check_f32_cpu(w2, "w2");
    TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0) && w13.size(2) == w2.size(1) &&
                w13.size(1) == 2 * w2.size(2), "moe_pack: weights must be [E, 2I, H] and [E, H, I]");
    const int64_t E = w13.size(0), H = w13.size(2), I = w2.size(2);
    TORCH_CHECK(H % 16 == 0 && I % 16 == 0, "moe_pack: H and I must be multiples of 16");
    const at::Tensor a = w13.contiguous(), b = w2.contiguous();
    at::Tensor pa = at::empty_like(a), pb = at::empty_like(b);
    moe_pack_f32(a.data_ptr<float>(), b.data_ptr<float>(), pa.data_ptr<float>(), pb.data_ptr<float>(), E, H, I);
    return {pa, pb};
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight_packed, const std::optional<at::Tensor>& bias) {
    // x [M, K] @ W^T (+ bias) -> [M, N]; weight_packed [N, K] holding W's panels (linear_pack)
    check_f32_cpu(x, "x");
    check_f32_cpu(weight_packed, "weight_packed");
    TORCH_CHECK(x.dim() == 2 && weight_packed.dim() == 2 && x.size(1) == weight_packed.size(1),
                "linear: x must be [M, K] and the weight [N, K]");
    TORCH_CHECK(weight_packed.is_contiguous(), "linear: the packed weight must be contiguous");
    const int64_t M = x.size(0), N = weight_packed.size(0), K = x.size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return y;
    const at::Tensor xc = x.contiguous();
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
        b = bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b.numel() == N, "linear: bias must have ", N, " elements");
    }
    const int threads = M * N * K >= kMinMacsPerThreading ? at::get_num_threads() : 1;
    check_rc(linear_f32(xc.data_ptr<float>(), weight_packed.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                        y.data_ptr<float>(), M, N, K, K, threads),
             "linear");
    return y;
}

at::Tensor linear_pack(const at::Tensor& weight) {
    // W [N, K] -> its panels [N/16, K, 16], stored in a tensor of W's shape
    check_f32_cpu(weight, "weight");
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 16 == 0, "linear_pack: the weight must be [N, K], N a multiple of 16");
    const at::Tensor w = weight.contiguous();
    at::Tensor packed = at::empty_like(w);
    linear_pack_f32(w.data_ptr<float>(), packed.data_ptr<float>(), w.size(0), w.size(1));
    return packed;
}

// -- quantized weights (csrc/quant_gemm.h) ----------------------------------------------------
int64_t quant_k(int64_t fmt, const at::Tensor& q) { return fmt >= 2 ? 2 * q.size(-1) : q.size(-1); }

void check_quant(int64_t fmt, const at::Tensor& q, const at::Tensor& d, const std::optional<at::Tensor>& m,
                 const char* op) {
    TORCH_CHECK(fmt >= 0 && fmt <= 3, op, ": unknown quantized format ", fmt);
    TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kByte && q.is_contiguous(), op,
                ": quantized weights must be contiguous uint8 CPU tensors");
    TORCH_CHECK(d.device().is_cpu() && d.scalar_type() == at::kHalf && d.is_contiguous(), op,
                ": scales must be contiguous float16 CPU tensors");
    const int64_t K = quant_k(fmt, q), S = fmt == 1 ? 1 : K / 32;
    TORCH_CHECK(K % 32 == 0, op, ": the input size must be a multiple of 32, got ", K);
    TORCH_CHECK(d.dim() == q.dim() && d.size(-1) == S && d.numel() / S == q.numel() / q.size(-1), op,
                ": scales must be [..., rows, ", S, "]");
    if (fmt == 3) {
        TORCH_CHECK(m.has_value() && m->defined() && m->sizes() == d.sizes() && m->scalar_type() == at::kHalf &&
                    m->is_contiguous(), op, ": int4 with zero points needs float16 minimums shaped as the scales");
    }
}

const uint16_t* half_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t fmt, const std::optional<at::Tensor>& bias) {
    // x [M, K] @ W^T (+ bias) -> [M, N]; W quantized: qweight [N, K] (int8) or [N, K/2] (int4) uint8, scales fp16
    check_f32_cpu(x, "x");
    check_quant(fmt, qweight, scales, mins, "quant_linear");
    TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && x.size(1) == quant_k(fmt, qweight),
                "quant_linear: x must be [M, K] and the weight [N, K]");
    const int64_t M = x.size(0), N = qweight.size(0), K = x.size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return y;
    const at::Tensor xc = x.contiguous();
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
        b = bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b.numel() == N, "quant_linear: bias must have ", N, " elements");
    }
    const int threads = M * N * K >= kMinMacsPerThreading / 4 ? at::get_num_threads() : 1;
    check_rc(qlinear_f32(xc.data_ptr<float>(), K, static_cast<int>(fmt), qweight.data_ptr<uint8_t>(), half_ptr(scales),
                         fmt == 3 ? half_ptr(*mins) : nullptr, b.defined() ? b.data_ptr<float>() : nullptr,
                         y.data_ptr<float>(), M, N, K, threads),
             "quant_linear");
    return y;
}

at::Tensor quant_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t fmt,
                     const at::Tensor& q13, const at::Tensor& s13, const std::optional<at::Tensor>& m13,
                     const at::Tensor& q2, const at::Tensor& s2, const std::optional<at::Tensor>& m2) {
    // x [T, H]; topk [T, k]; quantized w13 [E, 2I, H], w2 [E, H, I] -> [T, H]
    check_f32_cpu(x, "x");
    check_quant(fmt, q13, s13, m13, "quant_moe");
    check_quant(fmt, q2, s2, m2, "quant_moe");
    TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.sizes() == topk_weights.sizes() &&
                topk_ids.size(0) == x.size(0), "quant_moe: x must be [T, H], topk_ids and topk_weights [T, k]");
    TORCH_CHECK(q13.dim() == 3 && q2.dim() == 3 && q13.size(0) == q2.size(0) && quant_k(fmt, q13) == x.size(1) &&
                q2.size(1) == x.size(1) && q13.size(1) == 2 * quant_k(fmt, q2),
                "quant_moe: weights must be [E, 2I, H] and [E, H, I]");
    const int64_t T = x.size(0), k = topk_ids.size(1), E = q13.size(0), H = x.size(1), I = quant_k(fmt, q2);
    at::Tensor out = at::empty({T, H}, x.options());
    if (T == 0) return out;
    const at::Tensor xc = x.contiguous();
    const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
    const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
    const int threads = T * k >= kMinPairsPerThreading / 2 ? at::get_num_threads() : 1;
    check_rc(qmoe_f32(xc.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(), static_cast<int>(fmt),
                      q13.data_ptr<uint8_t>(), half_ptr(s13), fmt == 3 ? half_ptr(*m13) : nullptr,
                      q2.data_ptr<uint8_t>(), half_ptr(s2), fmt == 3 ? half_ptr(*m2) : nullptr, out.data_ptr<float>(),
                      T, k, E, H, I, threads),
             "quant_moe");
    return out;
}

std::vector<int64_t> quant_isa(int64_t level) {
    // level -1: query; 0: the best this CPU runs; 1 avx2, 2 avx512, 3 avx512vnni -> [current, best]
    if (level >= 0) {
        TORCH_CHECK(quant_isa_set(static_cast<int>(level)) > 0, "quant_isa: level ", level,
                    " is not supported by this CPU (best: ", quant_isa_best(), ")");
    }
    return {quant_isa_get(), quant_isa_best()};
}

std::vector<int64_t> build_info() {
    // [built with AVX2 + FMA, threads from PyTorch's OpenMP pool]
    return {moe_cpu_available(), cpu_kernels_openmp()};
}

}  // namespace

#define MOE_SERVE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MOE_SERVE_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

MOE_SERVE_LIBRARY(MOE_SERVE_OPS_NS, m) {
    m.def("paged_decode_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale) -> Tensor");
    m.def("moe_experts_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_packed, Tensor w2_packed) "
          "-> Tensor");
    m.def("moe_pack_cpu(Tensor w13, Tensor w2) -> (Tensor, Tensor)");
    m.def("linear_cpu(Tensor x, Tensor weight_packed, Tensor? bias) -> Tensor");
    m.def("linear_pack_cpu(Tensor weight) -> Tensor");
    m.def("cpu_kernels_info() -> int[]");
    m.def("quant_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int fmt, Tensor? bias) -> Tensor");
    m.def("quant_moe_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, int fmt, Tensor q13, Tensor s13, "
          "Tensor? m13, Tensor q2, Tensor s2, Tensor? m2) -> Tensor");
    m.def("quant_isa(int level) -> int[]");
}

MOE_SERVE_LIBRARY_IMPL(MOE_SERVE_OPS_NS, CPU, m) {
    m.impl("paged_decode_cpu", &paged_decode);
    m.impl("moe_experts_cpu", &moe_experts);
    m.impl("moe_pack_cpu", &moe_pack);
    m.impl("linear_cpu", &linear);
    m.impl("linear_pack_cpu", &linear_pack);
    m.impl("quant_linear_cpu", &quant_linear);
    m.impl("quant_moe_cpu", &quant_moe);
}

MOE_SERVE_LIBRARY_IMPL(MOE_SERVE_OPS_NS, CompositeExplicitAutograd, m) {
    m.impl("cpu_kernels_info", &build_info);
    m.impl("quant_isa", &quant_isa);
}
