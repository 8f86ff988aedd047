/* The C kernels' entry points: the one declaration both their definitions (*.c) and their
 * callers (ops.cpp, the torch.library ops) compile against, so that a changed signature fails
 * the build instead of corrupting memory. Shapes and return codes: see each definition. */
#ifndef MOE_SERVE_KERNELS_H
#define MOE_SERVE_KERNELS_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 where the kernels are built (AVX2 + FMA), 0 otherwise (the entry points then return 4) */
int moe_cpu_available(void);
/* 1 when built with -fopenmp: the kernels' threads are PyTorch's OpenMP pool */
int cpu_kernels_openmp(void);

int paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables, const int64_t *lens,
                     float *out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t W, float scale,
                     int nthreads);
/* the same with a sliding window / attention chunk (0: none) and per-head sinks [H] (NULL: none) */
int paged_decode_variant_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                             const int64_t *lens, const float *sinks, float *out, int64_t B, int64_t H,
                             int64_t KVH, int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk,
                             float scale, int nthreads);
/* the same over a bfloat16 cache (its 16-bit words), widened to float32 in the kernel */
int paged_decode_bf16(const float *q, const uint16_t *k16, const uint16_t *v16, const int64_t *tables,
                      const int64_t *lens, const float *sinks, float *out, int64_t B, int64_t H, int64_t KVH,
                      int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk, float scale, int nthreads);
/* the same over a float8_e4m3fn cache (its bytes): keys k8 * k_scale, values v8 * v_scale */
int paged_decode_fp8(const float *q, const uint8_t *k8, const uint8_t *v8, float k_scale, float v_scale,
                     const int64_t *tables, const int64_t *lens, const float *sinks, float *out, int64_t B,
                     int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk,
                     float scale, int nthreads);
int moe_fused_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const float *w13p, const float *w2p,
                  float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads);
int moe_fused_variant_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const float *w13p,
                          const float *w2p, const float *b13, const float *b2, int clamp, float alpha, float limit,
                          int weight_on_input, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                          int nthreads);
int moe_route_f32(const float *logits, const float *corr, float *weights, int64_t *ids, int64_t T, int64_t E,
                  int64_t k, int scoring, int renormalize, float renorm_min, int64_t n_group, int64_t topk_group,
                  int group_top2, float scaling);
/* bf16 weights [E, 2I, H] / [E, H, I] as they are (uint16), float32 math (moe_bf16_cpu.c) */
int moe_fused_bf16(const float *x, const int64_t *topk_ids, const float *topk_w, const uint16_t *w13,
                   const uint16_t *w2, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                   int nthreads);
void moe_pack_f32(const float *w13, const float *w2, float *w13p, float *w2p, int64_t E, int64_t H, int64_t I);
int linear_f32(const float *x, const float *Wp, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
               int64_t ldx, int nthreads);
void linear_pack_f32(const float *W, float *Wp, int64_t N, int64_t K);
int mla_decode_f32(const float *q_lat, const float *q_pe, const float *lat, const float *pe, const int64_t *tables,
                   const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR, int64_t PW,
                   int64_t BS, int64_t W, float scale, int nthreads);
/* the same over a bfloat16 (kind 1) or float8_e4m3fn (kind 2, values x8 * kscale) latent cache */
int mla_decode_q(const float *q_lat, const float *q_pe, const void *lat, const void *pe, int kind, float kscale,
                 const int64_t *tables, const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR,
                 int64_t PW, int64_t BS, int64_t W, float scale, int nthreads);

/* quantized weights (quant_gemm.h: formats 0 int8/32, 1 int8/channel, 2 int4/32, 3 int4/32 + zero point) */
int quant_isa_best(void);
int quant_isa_set(int level);
int quant_isa_get(void);
int qlinear_f32(const float *x, int64_t ldx, int fmt, const uint8_t *q, const uint16_t *d, const uint16_t *mins,
                const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads);
int qmoe_f32(const float *x, const int64_t *topk_ids, const float *topk_w, int fmt, const uint8_t *q13,
             const uint16_t *d13, const uint16_t *m13, const uint8_t *q2, const uint16_t *d2, const uint16_t *m2,
             float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads);

/* fp8 (float8_e4m3fn bytes) weights with float32 scales per bn x bk block (fp8_cpu.c; channel:
 * bn 1, bk K; tensor: bn N, bk K); the instruction-set level is quant_isa_get()'s */
int fp8_linear_f32(const float *x, int64_t ldx, const uint8_t *q, const float *s, int64_t bn, int64_t bk,
                   const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads);
int fp8_moe_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const uint8_t *q13, const float *s13,
                int64_t bn13, int64_t bk13, const uint8_t *q2, const float *s2, int64_t bn2, int64_t bk2,
                const float *b13, const float *b2, int clamp, float alpha, float limit, int weight_on_input,
                float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads);
/* bf16 weights [N, K] as they are (uint16), float32 math (linear_bf16_cpu.c); levels 1 AVX2, 2 AVX-512F,
 * 4 AVX512-BF16 (3, the quantized kernels' VNNI level, runs 2) */
int bf16_isa_best(void);
int bf16_isa_set(int level);
int bf16_isa_get(void);
int linear_bf16(const float *x, int64_t ldx, const uint16_t *W, const float *bias, float *y, int64_t M, int64_t N,
                int64_t K, int nthreads);
/* RMSNorm (after a residual add: res non-NULL, the sum stored into `sum`) and rotary + KV store,
 * float32 rows (norm_rope_cpu.c) */
void rmsnorm_f32(const float *x, int64_t ldx, const float *res, int64_t ldr, const float *w, float *out,
                 int64_t ldo, float *sum, int64_t lds, int64_t T, int64_t N, float eps);
int rope_write_kv_f32(const float *qkv, int64_t ldqkv, const float *cos, const float *sin, int64_t ldcs,
                      float *k_cache, float *v_cache, int64_t num_slots, const int64_t *slots, float *q_out,
                      int64_t T, int64_t H, int64_t KVH, int64_t D, const float *q_norm, const float *k_norm,
                      float eps);

#ifdef __cplusplus
}
#endif
#endif
