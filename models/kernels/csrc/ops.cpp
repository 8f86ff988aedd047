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

// below this many multiply-adds one thread is faster than starting others
constexpr int64_t kMinMacsPerThreading = int64_t{1} << 24;

// Threads for an experts call: all of them once its token-expert pairs' multiply-adds
// (pairs x 3 x H x I) reach `min_macs`, else one. Counted in work, not pairs: a decode step's
// two pairs of a 140M model's small experts are done before a second thread wakes, while the
// same two pairs of a 2.4B model's experts read 40 MB of weights, which two threads read twice
// as fast as one.
static int moe_threads(int64_t pairs, int64_t H, int64_t I, int64_t min_macs) {
    return pairs * 3 * H * I >= min_macs ? at::get_num_threads() : 1;
}

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
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                        int64_t chunk, const std::optional<at::Tensor>& sinks) {
    // q [B, H, D]; caches [NB, BS, KVH, D]; block_tables [B, W]; seq_lens [B] -> [B, H, D]
    // window / chunk: each query sees its last `window` keys / its own chunk's keys (0: all);
    // sinks [H]: a per-head logit in each softmax's denominator (gpt-oss)
    // the cache: float32, or bfloat16 (--kv-cache-dtype bfloat16 on a float32 model), widened in the kernel
    check_f32_cpu(q, "q");
    const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
    for (const at::Tensor* c : {&k_cache, &v_cache}) {
        TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == k_cache.scalar_type() &&
                    (c->scalar_type() == at::kFloat || bf16), "paged_decode: the KV cache must be a float32 or "
                    "bfloat16 CPU tensor pair, got ", c->scalar_type());
    }
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_decode: q must be "
                "[B, H, D] and the caches [blocks, block_size, kv_heads, D] alike");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the KV cache must be contiguous");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(2);
    TORCH_CHECK(k_cache.size(3) == D && KVH > 0 && H % KVH == 0, "paged_decode: head sizes do not match");
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
                "paged_decode: block_tables [B, W] and seq_lens [B] must match q's batch");
    TORCH_CHECK(window >= 0 && chunk >= 0, "paged_decode: window and chunk must be >= 0 (0: none)");
    at::Tensor sk;
    if (sinks.has_value() && sinks->defined()) {
        TORCH_CHECK(sinks->device().is_cpu() && sinks->numel() == H, "paged_decode: sinks must be a CPU tensor of ",
                    H, " per-head logits");
        sk = sinks->to(at::kFloat).contiguous();
    }
    const at::Tensor qc = q.contiguous();
    const at::Tensor tables = block_tables.to(at::kLong).contiguous();
    const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
    at::Tensor out = at::empty_like(qc);
    const int rc = bf16 ? paged_decode_bf16(
        qc.data_ptr<float>(), static_cast<const uint16_t*>(k_cache.const_data_ptr()),
        static_cast<const uint16_t*>(v_cache.const_data_ptr()), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
        sk.defined() ? sk.data_ptr<float>() : nullptr, out.data_ptr<float>(), B, H, KVH, D, k_cache.size(1),
        tables.size(1), window, chunk, static_cast<float>(scale), at::get_num_threads())
        : paged_decode_variant_f32(
        qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables.data_ptr<int64_t>(),
        lens.data_ptr<int64_t>(), sk.defined() ? sk.data_ptr<float>() : nullptr, out.data_ptr<float>(), B, H, KVH, D,
        k_cache.size(1), tables.size(1), window, chunk, static_cast<float>(scale), at::get_num_threads());
    TORCH_CHECK(rc == 0, "paged_decode: could not allocate its score buffer");
    return out;
}

at::Tensor paged_decode_fp8_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, double k_scale,
                               double v_scale, int64_t window, int64_t chunk, const std::optional<at::Tensor>& sinks) {
    // paged_decode over a float8_e4m3fn cache (--kv-cache-dtype fp8): keys k8 * k_scale, values
    // v8 * v_scale, converted to float32 in the kernel
    check_f32_cpu(q, "q");
    for (const at::Tensor* c : {&k_cache, &v_cache}) {
        TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat8_e4m3fn,
                    "paged_decode_fp8: the KV cache must be a float8_e4m3fn CPU tensor, got ", c->scalar_type());
    }
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_decode_fp8: q must "
                "be [B, H, D] and the caches [blocks, block_size, kv_heads, D] alike");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_fp8: the KV cache must be contiguous");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(2);
    TORCH_CHECK(k_cache.size(3) == D && KVH > 0 && H % KVH == 0, "paged_decode_fp8: head sizes do not match");
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
                "paged_decode_fp8: block_tables [B, W] and seq_lens [B] must match q's batch");
    TORCH_CHECK(window >= 0 && chunk >= 0, "paged_decode_fp8: window and chunk must be >= 0 (0: none)");
    TORCH_CHECK(k_scale > 0 && v_scale > 0, "paged_decode_fp8: k_scale and v_scale must be > 0");
    at::Tensor sk;
    if (sinks.has_value() && sinks->defined()) {
        TORCH_CHECK(sinks->device().is_cpu() && sinks->numel() == H, "paged_decode_fp8: sinks must be a CPU tensor of ",
                    H, " per-head logits");
        sk = sinks->to(at::kFloat).contiguous();
    }
    const at::Tensor qc = q.contiguous();
    const at::Tensor tables = block_tables.to(at::kLong).contiguous();
    const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
    at::Tensor out = at::empty_like(qc);
    const int rc = paged_decode_fp8(
        qc.data_ptr<float>(), static_cast<const uint8_t*>(k_cache.const_data_ptr()),
        static_cast<const uint8_t*>(v_cache.const_data_ptr()), static_cast<float>(k_scale),
        static_cast<float>(v_scale), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
        sk.defined() ? sk.data_ptr<float>() : nullptr, out.data_ptr<float>(), B, H, KVH, D, k_cache.size(1),
        tables.size(1), window, chunk, static_cast<float>(scale), at::get_num_threads());
    TORCH_CHECK(rc == 0, "paged_decode_fp8: could not allocate its score buffer");
    return out;
}

at::Tensor moe_experts_impl(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                            const at::Tensor& w13_packed, const at::Tensor& w2_packed,
                            const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                            std::optional<double> limit, double alpha, bool weight_on_input) {
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
    at::Tensor b13, b2;
    if (w13_bias.has_value() && w13_bias->defined()) {
        b13 = w13_bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b13.numel() == E * 2 * I, "moe_experts: w13_bias must be [E, 2I]");
    }
    if (w2_bias.has_value() && w2_bias->defined()) {
        b2 = w2_bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b2.numel() == E * H, "moe_experts: w2_bias must be [E, H]");
    }
    const int threads = moe_threads(T * k, H, I, kMinMacsPerThreading);
    check_rc(moe_fused_variant_f32(xc.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(),
                                   w13_packed.data_ptr<float>(), w2_packed.data_ptr<float>(),
                                   b13.defined() ? b13.data_ptr<float>() : nullptr,
                                   b2.defined() ? b2.data_ptr<float>() : nullptr, limit.has_value() ? 1 : 0,
                                   static_cast<float>(alpha), static_cast<float>(limit.value_or(0.0)),
                                   weight_on_input ? 1 : 0, out.data_ptr<float>(), T, k, E, H, I, threads),
             "moe_experts");
    return out;
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       const at::Tensor& w13_packed, const at::Tensor& w2_packed) {
    // x [T, H]; topk_ids, topk_weights [T, k]; packed w13 [E, 2I, H], w2 [E, H, I] (moe_pack) -> [T, H]
    return moe_experts_impl(x, topk_ids, topk_weights, w13_packed, w2_packed, std::nullopt, std::nullopt, std::nullopt,
                            1.702, false);
}

at::Tensor moe_experts_variant(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                               const at::Tensor& w13_packed, const at::Tensor& w2_packed,
                               const std::optional<at::Tensor>& w13_bias, const std::optional<at::Tensor>& w2_bias,
                               std::optional<double> limit, double alpha, bool weight_on_input) {
    // moe_experts with the family variants: biases w13_bias [E, 2I], w2_bias [E, H]; the clamped
    // SwiGLU where `limit` is given (with `alpha`); routing weights on the input (csrc/moe_cpu.c)
    return moe_experts_impl(x, topk_ids, topk_weights, w13_packed, w2_packed, w13_bias, w2_bias, limit, alpha,
                            weight_on_input);
}

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
                                             int64_t top_k, c10::string_view scoring, bool renormalize,
                                             double renorm_min, int64_t n_group, int64_t topk_group,
                                             c10::string_view group_score, double scaling) {
    // logits [T, E] float32 -> (weights [T, k] float32, ids [T, k] int64), as router.select_experts
    check_f32_cpu(logits, "logits");
    TORCH_CHECK(logits.dim() == 2, "moe_route: logits must be [T, E]");
    const int64_t T = logits.size(0), E = logits.size(1);
    const int sc = scoring == "softmax" ? 0 : scoring == "sigmoid" ? 1 : scoring == "softmax_topk" ? 2 : -1;
    TORCH_CHECK(sc >= 0, "moe_route: scoring must be softmax, sigmoid or softmax_topk");
    TORCH_CHECK(group_score == "max" || group_score == "top2_sum", "moe_route: group_score must be max or top2_sum");
    TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_route: top_k must be in [1, E]");
    TORCH_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
                "moe_route: the experts must split into n_group groups, topk_group of them kept");
    TORCH_CHECK(group_score == "max" || n_group == 1 || E / n_group >= 2, "moe_route: top2_sum needs 2 experts per group");
    at::Tensor corr;
    if (correction_bias.has_value() && correction_bias->defined()) {
        corr = correction_bias->to(at::kFloat).contiguous();
        TORCH_CHECK(corr.numel() == E, "moe_route: correction_bias must have E elements");
    }
    const at::Tensor lc = logits.contiguous();
    at::Tensor w = at::empty({T, top_k}, logits.options());
    at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
    check_rc(moe_route_f32(lc.data_ptr<float>(), corr.defined() ? corr.data_ptr<float>() : nullptr, w.data_ptr<float>(),
                           ids.data_ptr<int64_t>(), T, E, top_k, sc, renormalize ? 1 : 0, static_cast<float>(renorm_min),
                           n_group, topk_group, group_score == "top2_sum" ? 1 : 0, static_cast<float>(scaling)),
             "moe_route");
    return {w, ids};
}

at::Tensor moe_experts_bf16(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                            const at::Tensor& w13, const at::Tensor& w2) {
    // x [T, H] float32; topk_ids, topk_weights [T, k]; bf16 w13 [E, 2I, H], w2 [E, H, I] as they are
    // (no packed copy; csrc/moe_bf16_cpu.c) -> [T, H] float32
    check_f32_cpu(x, "x");
    for (const at::Tensor* t : {&w13, &w2})
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous(),
                    "moe_experts_bf16: weights must be contiguous bfloat16 CPU tensors");
    TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.sizes() == topk_weights.sizes() &&
                topk_ids.size(0) == x.size(0), "moe_experts_bf16: x must be [T, H], topk_ids and topk_weights [T, k]");
    TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(2) == x.size(1) && w2.size(1) == x.size(1) &&
                w13.size(1) == 2 * w2.size(2) && w13.size(0) == w2.size(0),
                "moe_experts_bf16: weights must be [E, 2I, H] and [E, H, I]");
    const int64_t T = x.size(0), k = topk_ids.size(1), E = w13.size(0), H = x.size(1), I = w2.size(2);
    TORCH_CHECK(H % 16 == 0 && I % 16 == 0, "moe_experts_bf16: H and I must be multiples of 16");
    at::Tensor out = at::empty({T, H}, x.options());
    if (T == 0) return out;
    const at::Tensor xc = x.contiguous();
    const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
    const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
    const int threads = moe_threads(T * k, H, I, kMinMacsPerThreading);
    check_rc(moe_fused_bf16(xc.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(),
                            reinterpret_cast<const uint16_t*>(w13.data_ptr<at::BFloat16>()),
                            reinterpret_cast<const uint16_t*>(w2.data_ptr<at::BFloat16>()), out.data_ptr<float>(),
                            T, k, E, H, I, threads),
             "moe_experts_bf16");
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

at::Tensor mla_decode(const at::Tensor& q_lat, const at::Tensor& q_pe, const at::Tensor& lat_cache,
                      const at::Tensor& pe_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                      double scale, double k_scale) {
    // q_lat [B, H, R], q_pe [B, H, DR]; caches [NB, BS, 1, R] and [NB, BS, 1, PW >= DR];
    // block_tables [B, W]; seq_lens [B] -> [B, H, R] (csrc/mla_decode_cpu.c). The caches: float32,
    // bfloat16 or float8_e4m3fn (values x8 * k_scale), converted in the kernel
    check_f32_cpu(q_lat, "q_lat");
    check_f32_cpu(q_pe, "q_pe");
    const at::ScalarType ct = lat_cache.scalar_type();
    TORCH_CHECK(lat_cache.device().is_cpu() && pe_cache.device().is_cpu() && pe_cache.scalar_type() == ct &&
                (ct == at::kFloat || ct == at::kBFloat16 || ct == at::kFloat8_e4m3fn),
                "mla_decode: the caches must be a float32, bfloat16 or float8_e4m3fn CPU tensor pair, got ", ct,
                " and ", pe_cache.scalar_type());
    TORCH_CHECK(k_scale > 0, "mla_decode: k_scale must be > 0");
    TORCH_CHECK(q_lat.dim() == 3 && q_pe.dim() == 3 && q_pe.size(0) == q_lat.size(0) && q_pe.size(1) == q_lat.size(1),
                "mla_decode: q_lat must be [B, H, R] and q_pe [B, H, DR]");
    TORCH_CHECK(lat_cache.dim() == 4 && pe_cache.dim() == 4 && lat_cache.size(2) == 1 && pe_cache.size(2) == 1 &&
                lat_cache.size(0) == pe_cache.size(0) && lat_cache.size(1) == pe_cache.size(1),
                "mla_decode: the caches must be [blocks, block_size, 1, R] and [blocks, block_size, 1, PW] alike");
    TORCH_CHECK(lat_cache.size(3) == q_lat.size(2) && pe_cache.size(3) >= q_pe.size(2),
                "mla_decode: the latent width must match q_lat's and the rotary row hold q_pe's width");
    TORCH_CHECK(lat_cache.is_contiguous() && pe_cache.is_contiguous(), "mla_decode: the caches must be contiguous");
    const int64_t B = q_lat.size(0), H = q_lat.size(1), R = q_lat.size(2), DR = q_pe.size(2);
    TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
                "mla_decode: block_tables [B, W] and seq_lens [B] must match q's batch");
    const at::Tensor ql = q_lat.contiguous(), qp = q_pe.contiguous();
    const at::Tensor tables = block_tables.to(at::kLong).contiguous();
    const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
    at::Tensor out = at::empty({B, H, R}, ql.options());
    if (B == 0) return out;
    if (ct == at::kFloat) {
        check_rc(mla_decode_f32(ql.data_ptr<float>(), qp.data_ptr<float>(), lat_cache.data_ptr<float>(),
                                pe_cache.data_ptr<float>(), tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                                out.data_ptr<float>(), B, H, R, DR, pe_cache.size(3), lat_cache.size(1),
                                tables.size(1), static_cast<float>(scale), at::get_num_threads()),
                 "mla_decode");
    } else {
        check_rc(mla_decode_q(ql.data_ptr<float>(), qp.data_ptr<float>(), lat_cache.const_data_ptr(),
                              pe_cache.const_data_ptr(), ct == at::kBFloat16 ? 1 : 2, static_cast<float>(k_scale),
                              tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, R,
                              DR, pe_cache.size(3), lat_cache.size(1), tables.size(1), static_cast<float>(scale),
                              at::get_num_threads()),
                 "mla_decode");
    }
    return out;
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
    TORCH_CHECK(q.dim() >= 2 && q.size(-2) % 8 == 0, op, ": the output size must be a multiple of 8 (the kernel "
                "order stores groups of 8 rows), got ", q.dim() >= 2 ? q.size(-2) : 0);
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
    // x [M, K] @ W^T (+ bias) -> [M, N]; W quantized: qweight [N, K] (int8) or [N, K/2] (int4) uint8, scales fp16,
    // in the kernel order (csrc/quant_gemm.h; models/kernels/quant.py to_kernel_order)
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
    const int threads = moe_threads(T * k, H, I, kMinMacsPerThreading / 4);
    check_rc(qmoe_f32(xc.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(), static_cast<int>(fmt),
                      q13.data_ptr<uint8_t>(), half_ptr(s13), fmt == 3 ? half_ptr(*m13) : nullptr,
                      q2.data_ptr<uint8_t>(), half_ptr(s2), fmt == 3 ? half_ptr(*m2) : nullptr, out.data_ptr<float>(),
                      T, k, E, H, I, threads),
             "quant_moe");
    return out;
}

// A kernel family's instruction-set level: level -1 queries, 0 sets the best this CPU runs, a
// higher one sets that level (refused above the CPU's best) -> [current, best]
std::vector<int64_t> isa_level(int64_t level, int (*set)(int), int (*get)(void), int (*best)(void), const char* op) {
    if (level >= 0) {
        TORCH_CHECK(set(static_cast<int>(level)) > 0, op, ": level ", level, " is not supported by this CPU (best: ",
                    best(), ")");
    }
    return {get(), best()};
}

std::vector<int64_t> quant_isa(int64_t level) {
    // 1 avx2, 2 avx512, 3 avx512vnni
    return isa_level(level, quant_isa_set, quant_isa_get, quant_isa_best, "quant_isa");
}

// -- fp8 weights (csrc/fp8_cpu.c) -----------------------------------------------------------------
// A weight: float8_e4m3fn [..., N, K] and float32 scales [..., ceil(N/bn), ceil(K/bk)] (fp8_block:
// (bn, bk) its block; fp8_channel: (1, K); fp8_tensor: (N, K))
void check_fp8(const at::Tensor& w, const at::Tensor& s, int64_t bn, int64_t bk, int64_t lead, const char* op) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat8_e4m3fn && w.is_contiguous(), op,
                ": fp8 weights must be contiguous float8_e4m3fn CPU tensors, got ", w.scalar_type());
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous(), op,
                ": fp8 scales must be contiguous float32 CPU tensors, got ", s.scalar_type());
    TORCH_CHECK(w.dim() == lead + 2, op, ": fp8 weights must have ", lead + 2, " dims, got ", w.dim());
    TORCH_CHECK(bn >= 1 && bk >= 1, op, ": the scale blocks must be at least 1x1, got ", bn, "x", bk);
    const int64_t N = w.size(-2), K = w.size(-1), per = ((N + bn - 1) / bn) * ((K + bk - 1) / bk);
    const int64_t mats = lead ? w.size(0) : 1;
    TORCH_CHECK(s.numel() == mats * per, op, ": ", s.numel(), " scales for ", mats, " weight(s) of ", N, "x", K,
                " in blocks of ", bn, "x", bk, " (want ", per, " each)");
}

const uint8_t* fp8_ptr(const at::Tensor& t) { return reinterpret_cast<const uint8_t*>(t.data_ptr()); }

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t bn, int64_t bk,
                      const std::optional<at::Tensor>& bias) {
    // x [M, K] float32 @ dequant(weight [N, K])^T (+ bias) -> [M, N] float32
    check_f32_cpu(x, "x");
    check_fp8(weight, scale, bn, bk, 0, "fp8_linear");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "fp8_linear: x must be [M, K] and the weight [N, K]");
    const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return y;
    const at::Tensor xc = x.contiguous();
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
        b = bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b.numel() == N, "fp8_linear: bias must have ", N, " elements");
    }
    const int threads = M * N * K >= kMinMacsPerThreading ? at::get_num_threads() : 1;
    check_rc(fp8_linear_f32(xc.data_ptr<float>(), K, fp8_ptr(weight), scale.data_ptr<float>(), bn, bk,
                            b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, threads),
             "fp8_linear");
    return y;
}

at::Tensor fp8_moe(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                   const at::Tensor& w13, const at::Tensor& s13, int64_t bn13, int64_t bk13, const at::Tensor& w2,
                   const at::Tensor& s2, int64_t bn2, int64_t bk2, const std::optional<at::Tensor>& b13,
                   const std::optional<at::Tensor>& b2, std::optional<double> limit, double alpha,
                   bool weight_on_input) {
    // x [T, H]; topk [T, k]; fp8 w13 [E, 2I, H], w2 [E, H, I] with their scales; biases [E, 2I] / [E, H];
    // limit: gpt-oss's clamped SwiGLU (with alpha), else SiLU-and-mul -> [T, H] float32
    check_f32_cpu(x, "x");
    check_fp8(w13, s13, bn13, bk13, 1, "fp8_moe");
    check_fp8(w2, s2, bn2, bk2, 1, "fp8_moe");
    TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && topk_ids.sizes() == topk_weights.sizes() &&
                topk_ids.size(0) == x.size(0), "fp8_moe: x must be [T, H], topk_ids and topk_weights [T, k]");
    TORCH_CHECK(w13.size(0) == w2.size(0) && w13.size(2) == x.size(1) && w2.size(1) == x.size(1) &&
                w13.size(1) == 2 * w2.size(2), "fp8_moe: weights must be [E, 2I, H] and [E, H, I]");
    const int64_t T = x.size(0), k = topk_ids.size(1), E = w13.size(0), H = x.size(1), I = w2.size(2);
    at::Tensor c13, c2;
    if (b13.has_value() && b13->defined()) {
        c13 = b13->to(at::kFloat).contiguous();
        TORCH_CHECK(c13.numel() == E * 2 * I, "fp8_moe: w13's bias must be [E, 2I]");
    }
    if (b2.has_value() && b2->defined()) {
        c2 = b2->to(at::kFloat).contiguous();
        TORCH_CHECK(c2.numel() == E * H, "fp8_moe: w2's bias must be [E, H]");
    }
    at::Tensor out = at::empty({T, H}, x.options());
    if (T == 0) return out;
    const at::Tensor xc = x.contiguous();
    const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
    const at::Tensor w = topk_weights.to(at::kFloat).contiguous();
    const int threads = moe_threads(T * k, H, I, kMinMacsPerThreading / 4);
    check_rc(fp8_moe_f32(xc.data_ptr<float>(), ids.data_ptr<int64_t>(), w.data_ptr<float>(), fp8_ptr(w13),
                         s13.data_ptr<float>(), bn13, bk13, fp8_ptr(w2), s2.data_ptr<float>(), bn2, bk2,
                         c13.defined() ? c13.data_ptr<float>() : nullptr, c2.defined() ? c2.data_ptr<float>() : nullptr,
                         limit.has_value() ? 1 : 0, static_cast<float>(alpha),
                         limit.has_value() ? static_cast<float>(*limit) : 0.f, weight_on_input ? 1 : 0,
                         out.data_ptr<float>(), T, k, E, H, I, threads),
             "fp8_moe");
    return out;
}

// -- RMSNorm and rotary + KV store (csrc/norm_rope_cpu.c) --------------------------------------
static void check_rows(const at::Tensor& t, const char* name, int64_t N) {
    check_f32_cpu(t, name);
    TORCH_CHECK(t.dim() == 2 && t.size(1) == N && t.stride(1) == 1, name, " must be [T, ", N,
                "] with contiguous rows");
}

// the norm's width N: its weight, a contiguous float32 [N]
static int64_t norm_width(const at::Tensor& weight) {
    check_f32_cpu(weight, "weight");
    TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), "rmsnorm: weight must be a contiguous [N] tensor");
    return weight.size(0);
}

at::Tensor rmsnorm_cpu_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
    const int64_t N = norm_width(weight);
    check_rows(x, "x", N);
    at::Tensor out = at::empty({x.size(0), N}, x.options());
    rmsnorm_f32(x.data_ptr<float>(), x.stride(0), nullptr, 0, weight.data_ptr<float>(), out.data_ptr<float>(), N,
                nullptr, 0, x.size(0), N, static_cast<float>(eps));
    return out;
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu_op(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
    const int64_t N = norm_width(weight);
    check_rows(x, "x", N);
    check_rows(residual, "residual", N);
    TORCH_CHECK(residual.size(0) == x.size(0), "add_rmsnorm: x and residual must have the same rows");
    at::Tensor out = at::empty({x.size(0), N}, x.options()), sum = at::empty({x.size(0), N}, x.options());
    rmsnorm_f32(x.data_ptr<float>(), x.stride(0), residual.data_ptr<float>(), residual.stride(0),
                weight.data_ptr<float>(), out.data_ptr<float>(), N, sum.data_ptr<float>(), N, x.size(0), N,
                static_cast<float>(eps));
    return {out, sum};
}

at::Tensor rope_write_kv_cpu_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                double eps) {
    // qkv [T, (H + 2 KVH) D]; cos / sin [T, 1, D] (rows of D); caches [blocks, block_size, KVH, D]
    const int64_t T = qkv.size(0), H = num_heads, KVH = num_kv_heads, D = head_dim;
    check_rows(qkv, "qkv", (H + 2 * KVH) * D);
    for (const at::Tensor* c : {&cos, &sin}) {
        check_f32_cpu(*c, "cos/sin");
        TORCH_CHECK(c->numel() == T * D && c->stride(-1) == 1 && (T <= 1 || c->stride(0) >= D),
                    "rope_write_kv: cos and sin must hold T rows of ", D, " values");
    }
    for (const at::Tensor* c : {&k_cache, &v_cache}) {
        check_f32_cpu(*c, "k_cache/v_cache");
        TORCH_CHECK(c->is_contiguous() && c->dim() == 4 && c->size(2) == KVH && c->size(3) == D,
                    "rope_write_kv: the caches must be contiguous [blocks, block_size, ", KVH, ", ", D, "]");
    }
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "rope_write_kv: the K and V caches differ in shape");
    const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
    TORCH_CHECK(slots.numel() == T, "rope_write_kv: one slot per token");
    const bool norm = q_norm.has_value() && q_norm->defined();
    at::Tensor qn, kn;
    if (norm) {
        TORCH_CHECK(k_norm.has_value() && k_norm->defined(), "rope_write_kv: q_norm and k_norm come together");
        qn = q_norm->to(at::kFloat).contiguous();
        kn = k_norm->to(at::kFloat).contiguous();
        TORCH_CHECK(qn.numel() == D && kn.numel() == D, "rope_write_kv: head-norm weights of ", D, " values");
    }
    at::Tensor q = at::empty({T, H, D}, qkv.options());
    const int64_t ldcs = T > 1 ? cos.stride(0) : D;
    TORCH_CHECK(T <= 1 || sin.stride(0) == cos.stride(0), "rope_write_kv: cos and sin must share their layout");
    const int rc = rope_write_kv_f32(qkv.data_ptr<float>(), qkv.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                     ldcs, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                     k_cache.size(0) * k_cache.size(1), slots.data_ptr<int64_t>(), q.data_ptr<float>(),
                                     T, H, KVH, D, norm ? qn.data_ptr<float>() : nullptr,
                                     norm ? kn.data_ptr<float>() : nullptr, static_cast<float>(eps));
    TORCH_CHECK(rc != 1, "rope_write_kv: head_dim must be even and at most 1024");
    TORCH_CHECK_INDEX(rc != 2, "rope_write_kv: a slot is out of the cache's range");
    return q;
}

// -- bf16 weights, float32 math (csrc/linear_bf16_cpu.c) ----------------------------------------
at::Tensor linear_bf16_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    // x [M, K] float32 @ W^T (+ bias) -> [M, N] float32; W [N, K] bf16 in its panels
    // [N/16, ceil(K/2), 16, 2] (models/kernels/quant.py bf16_panels; csrc/linear_bf16_cpu.c)
    check_f32_cpu(x, "x");
    TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
                "linear_bf16: the weight must be a contiguous bfloat16 CPU tensor");
    TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && weight.dim() == 4 && weight.size(0) > 0 &&
                weight.size(1) == (x.size(1) + 1) / 2 && weight.size(2) == 16 && weight.size(3) == 2,
                "linear_bf16: x must be [M, K] and the weight's panels [N/16, ceil(K/2), 16, 2]");
    const int64_t M = x.size(0), N = 16 * weight.size(0), K = x.size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0) return y;
    const at::Tensor xc = x.contiguous();
    at::Tensor b;
    if (bias.has_value() && bias->defined()) {
        b = bias->to(at::kFloat).contiguous();
        TORCH_CHECK(b.numel() == N, "linear_bf16: bias must have ", N, " elements");
    }
    // a quarter of the float32 linear's bar, as the int8 / int4 linears: one thread reads a bf16
    // weight of 8 MB or more slower than two (the 2.4B model's q/k/v, 12 MB, and o, 8 MB, at one row:
    // 0.46 ms per call on one thread)
    const int threads = M * N * K >= kMinMacsPerThreading / 4 ? at::get_num_threads() : 1;
    check_rc(linear_bf16(xc.data_ptr<float>(), K, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()),
                         b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, threads),
             "linear_bf16");
    return y;
}

std::vector<int64_t> bf16_isa(int64_t level) {
    // 1 avx2, 2 (or 3) avx512, 4 avx512bf16
    return isa_level(level, bf16_isa_set, bf16_isa_get, bf16_isa_best, "bf16_isa");
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
          "float scale, int window=0, int chunk=0, Tensor? sinks=None) -> Tensor");
    m.def("paged_decode_fp8_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale, float k_scale=1.0, float v_scale=1.0, int window=0, int chunk=0, Tensor? sinks=None) -> Tensor");
    m.def("moe_experts_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_packed, Tensor w2_packed) "
          "-> Tensor");
    m.def("moe_pack_cpu(Tensor w13, Tensor w2) -> (Tensor, Tensor)");
    m.def("moe_experts_bf16_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w2) -> Tensor");
    m.def("moe_experts_variant_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_packed, "
          "Tensor w2_packed, Tensor? w13_bias, Tensor? w2_bias, float? limit, float alpha, bool weight_on_input) "
          "-> Tensor");
    m.def("moe_route_cpu(Tensor logits, Tensor? correction_bias, int top_k, str scoring, bool renormalize, "
          "float renorm_min, int n_group, int topk_group, str group_score, float scaling) -> (Tensor, Tensor)");
    m.def("linear_cpu(Tensor x, Tensor weight_packed, Tensor? bias) -> Tensor");
    m.def("linear_pack_cpu(Tensor weight) -> Tensor");
    m.def("mla_decode_cpu(Tensor q_lat, Tensor q_pe, Tensor lat_cache, Tensor pe_cache, Tensor block_tables, "
          "Tensor seq_lens, float scale, float k_scale=1.0) -> Tensor");
    m.def("cpu_kernels_info() -> int[]");
    m.def("quant_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int fmt, Tensor? bias) -> Tensor");
    m.def("quant_moe_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, int fmt, Tensor q13, Tensor s13, "
          "Tensor? m13, Tensor q2, Tensor s2, Tensor? m2) -> Tensor");
    m.def("quant_isa(int level) -> int[]");
    m.def("fp8_linear_cpu(Tensor x, Tensor weight, Tensor scale, int bn, int bk, Tensor? bias) -> Tensor");
    m.def("fp8_moe_cpu(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor s13, int bn13, int bk13, "
          "Tensor w2, Tensor s2, int bn2, int bk2, Tensor? b13, Tensor? b2, float? limit, float alpha, "
          "bool weight_on_input) -> Tensor");
    m.def("linear_bf16_cpu(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.def("bf16_isa(int level) -> int[]");
    m.def("rmsnorm_cpu(Tensor x, Tensor weight, float eps) -> Tensor");
    m.def("add_rmsnorm_cpu(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
    m.def("rope_write_kv_cpu(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor slot_mapping, int num_heads, int num_kv_heads, int head_dim, Tensor? q_norm, Tensor? k_norm, "
          "float eps) -> Tensor");
}

MOE_SERVE_LIBRARY_IMPL(MOE_SERVE_OPS_NS, CPU, m) {
    m.impl("paged_decode_cpu", &paged_decode);
    m.impl("paged_decode_fp8_cpu", &paged_decode_fp8_op);
    m.impl("moe_experts_cpu", &moe_experts);
    m.impl("moe_pack_cpu", &moe_pack);
    m.impl("moe_experts_bf16_cpu", &moe_experts_bf16);
    m.impl("moe_experts_variant_cpu", &moe_experts_variant);
    m.impl("moe_route_cpu", &moe_route);
    m.impl("linear_cpu", &linear);
    m.impl("linear_pack_cpu", &linear_pack);
    m.impl("mla_decode_cpu", &mla_decode);
    m.impl("quant_linear_cpu", &quant_linear);
    m.impl("quant_moe_cpu", &quant_moe);
    m.impl("fp8_linear_cpu", &fp8_linear);
    m.impl("fp8_moe_cpu", &fp8_moe);
    m.impl("linear_bf16_cpu", &linear_bf16_op);
    m.impl("rmsnorm_cpu", &rmsnorm_cpu_op);
    m.impl("add_rmsnorm_cpu", &add_rmsnorm_cpu_op);
    m.impl("rope_write_kv_cpu", &rope_write_kv_cpu_op);
}

MOE_SERVE_LIBRARY_IMPL(MOE_SERVE_OPS_NS, CompositeExplicitAutograd, m) {
    m.impl("cpu_kernels_info", &build_info);
    m.impl("quant_isa", &quant_isa);
    m.impl("bf16_isa", &bf16_isa);
}
