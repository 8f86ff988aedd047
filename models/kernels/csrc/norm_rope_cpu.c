/* The decode step's small fused ops on the CPU, float32: RMSNorm (after a residual add) and the
 * attention's rotary embedding + KV store. Each replaces 5-20 ATen calls per layer (a few
 * microseconds each, and the Python between them): about a tenth of a small model's decode step.
 * The same contracts as the Triton ops of models/kernels/triton_ops.py (their CUDA twins):
 *
 *   rmsnorm_f32: out = w * (s / sqrt(mean(s^2) + eps)), s = x (+ residual, stored into `sum`)
 *   rope_write_kv_f32: qkv [T, (H + 2 KVH) D] -> q [T, H, D] rotated (neox halves), k rotated
 *       and v stored at each token's cache slot; with q/k head-norm weights (Qwen3), each head is
 *       RMS-normed over D first.
 *
 * The roundings are the PyTorch code's (models/layers/norm.py, rotary.py) in float32: x * cos and
 * rotate_half(x) * sin each rounded, then added (no fused multiply-add: this file is compiled
 * with contraction off), the sum of squares in float32 (its order differs from ATen's reduction:
 * a last-bit difference). One token row at a time, nothing shared between rows: batch invariant.
 * Single-threaded: a decode row is a few microseconds of work, less than waking a thread.
 */
#pragma GCC optimize("fp-contract=off")

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

static inline float row_rstd(const float *s, int64_t n, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += s[i] * s[i];
    return 1.f / sqrtf(ss / (float)n + eps);
}

void rmsnorm_f32(const float *x, int64_t ldx, const float *res, int64_t ldr, const float *w, float *out,
                 int64_t ldo, float *sum, int64_t lds, int64_t T, int64_t N, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * ldx;
        const float *s = xr;
        if (res) {
            float *sr = sum + t * lds;
            const float *rr = res + t * ldr;
            for (int64_t i = 0; i < N; i++) sr[i] = xr[i] + rr[i];
            s = sr;
        }
        const float rstd = row_rstd(s, N, eps);
        float *o = out + t * ldo;
        for (int64_t i = 0; i < N; i++) {
            const float y = s[i] * rstd;
            o[i] = w[i] * y;
        }
    }
}

/* one head of D values: optional head norm, then the neox rotation into dst */
static inline void rope_head(const float *src, const float *c, const float *s, const float *norm_w, float eps,
                             int64_t D, float *dst, float *tmp) {
    const int64_t h = D / 2;
    const float *x = src;
    if (norm_w) {
        const float rstd = row_rstd(src, D, eps);
        for (int64_t i = 0; i < D; i++) {
            const float y = src[i] * rstd;
            tmp[i] = y * norm_w[i];
        }
        x = tmp;
    }
    for (int64_t i = 0; i < h; i++) {
        const float a1 = x[i] * c[i], b1 = -x[i + h] * s[i];
        const float a2 = x[i + h] * c[i + h], b2 = x[i] * s[i + h];
        dst[i] = a1 + b1;
        dst[i + h] = a2 + b2;
    }
}

/* Returns 0, or 1 for a head dim over 1024 / odd, 2 for a slot out of range. */
int rope_write_kv_f32(const float *qkv, int64_t ldqkv, const float *cos, const float *sin, int64_t ldcs,
                      float *k_cache, float *v_cache, int64_t num_slots, const int64_t *slots, float *q_out,
                      int64_t T, int64_t H, int64_t KVH, int64_t D, const float *q_norm, const float *k_norm,
                      float eps) {
    if (D > 1024 || D % 2) return 1;
    float tmp[1024];
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return 2;
    for (int64_t t = 0; t < T; t++) {
        const float *row = qkv + t * ldqkv, *c = cos + t * ldcs, *s = sin + t * ldcs;
        for (int64_t hh = 0; hh < H; hh++)
            rope_head(row + hh * D, c, s, q_norm, eps, D, q_out + (t * H + hh) * D, tmp);
        float *kd = k_cache + slots[t] * KVH * D, *vd = v_cache + slots[t] * KVH * D;
        for (int64_t hh = 0; hh < KVH; hh++) rope_head(row + (H + hh) * D, c, s, k_norm, eps, D, kd + hh * D, tmp);
        memcpy(vd, row + (H + KVH) * D, (size_t)(KVH * D) * sizeof(float));
    }
    return 0;
}
