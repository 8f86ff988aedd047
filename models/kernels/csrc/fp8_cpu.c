/* Linear layers and fused MoE experts over fp8 (float8_e4m3fn) weights with their scales on the
 * CPU: FP8 checkpoints (DeepSeek's 128x128 blocks, compressed-tensors' tensor / channel / block
 * strategies) and `--quantization fp8` run from their 1-byte weights, with no float copy.
 *
 * A weight W [N, K] is row-major bytes q [N, K] and float32 scales s [ceil(N/bn), ceil(K/bk)]:
 *   W[n, k] = e4m3(q[n, k]) * s[n / bn, k / bk]
 * which covers models/quant/formats.py's layouts: fp8_block (bn, bk) = the block; fp8_channel
 * (1, K); fp8_tensor (N, K). Activations and sums are float32.
 *
 * Conversion in registers: an e4m3fn byte (sign, 4 exponent bits biased by 7, 3 mantissa bits)
 * becomes the float16 with the same sign, exponent bits and mantissa bits placed in float16's
 * fields, (b & 0x80) << 8 | (b & 0x7f) << 7, whose value is the e4m3 value times 2^-8 (float16's
 * exponent bias is 15: 8 more), subnormals included (both formats' subnormals scale the same
 * way); F16C's VCVTPH2PS makes float32 of it, exact. The 2^8 is folded into the scale. e4m3fn
 * has no infinities and one NaN pattern per sign (0x7f, 0xff: it would read as 480): those are
 * made float16 NaNs. The bit shuffle is one 16-bit shift left by 8, an arithmetic shift right by
 * 1 (the sign lands in bits 15 and 14) and a mask clearing bit 14.
 *
 * y[M, N] = x[M, K] @ W^T (+ bias): each thread takes a range of W's rows, 16 at a time; every
 * row is read once per tile of up to F8_MR rows of x (4 on AVX2, 8 on AVX-512), which share its
 * converted weights. With more rows of x than a tile, the 16 rows are converted once into a
 * float32 buffer first, and every tile reads that (the same values, the same sums in the same
 * order: results do not depend on the batch). Each block of bk inputs is summed unscaled, then
 * added times its scale to the row's total, in k order.
 *
 * The experts follow moe_bf16_cpu.c / moe_quant_cpu.c: the pairs grouped by expert, gate and up
 * rows 16 at a time with the activation fused (SiLU-and-mul, or gpt-oss's clamped SwiGLU, with
 * the optional biases), then down, the weighted sum over the top-k; routing weights on the input
 * where asked (Llama 4). Pairs of routing weight 0 (the placement executor's padding) are skipped
 * where the weights scale the outputs.
 *
 * Levels: AVX2 + FMA + F16C, and AVX-512 (F + BW + VL, 512-bit vectors, 8-row tiles) compiled with
 * a target pragma whatever -march says; the level is the quantized kernels' (quant_isa_get in
 * linear_quant_cpu.c: the best this CPU runs, or MOE_SERVE_CPU_ISA's).
 */
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "panel_gemm.h"
#include "quant_gemm.h"

typedef struct {
    const uint8_t *q; /* [N, K] e4m3fn bytes */
    const float *s;   /* [ceil(N / bn), skb] */
    int64_t K, bn, bk, skb;
} f8mat_t;

/* the float32 value of an e4m3fn byte (scalar: the last inputs of a block) */
static inline float f8_value(uint8_t b) {
    if ((b & 0x7f) == 0x7f) return NAN;
    return _cvtsh_ss((unsigned short)(((b & 0x80) << 8) | ((b & 0x7f) << 7))) * 256.f;
}

static inline float f8_hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define F8N(x) x##_avx2
#define F8_WIDE 0
#define F8_MR 4
#include "fp8_body.h"
#undef F8N
#undef F8_WIDE
#undef F8_MR

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define F8_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#define F8N(x) x##_avx512
#define F8_WIDE 1
#define F8_MR 8
#include "fp8_body.h"
#undef F8N
#undef F8_WIDE
#undef F8_MR
#pragma GCC pop_options
#else
#define F8_HAVE_AVX512 0
#endif

#define F8CH 16 /* weight rows per chunk */

static int f8_wide(void) {
#if F8_HAVE_AVX512
    return quant_isa_get() >= ISA_AVX512;
#else
    return 0;
#endif
}

static int f8_mr(void) { return f8_wide() ? 8 : 4; }

/* rows [r0, r0 + nr) of W converted into fw (nr * K floats) */
static void f8_convert(const f8mat_t *W, int64_t r0, int nr, float *fw) {
    for (int c = 0; c < nr; c++) {
#if F8_HAVE_AVX512
        if (f8_wide()) { convert_row_avx512(W, r0 + c, fw + (int64_t)c * W->K); continue; }
#endif
        convert_row_avx2(W, r0 + c, fw + (int64_t)c * W->K);
    }
}

/* y[i * ldy + c] = x[i] . W[r0 + c] for i < M (rows ldx apart), c < nr <= 16: tiles of the
 * level's rows, over fw (nr rows converted) where it is given */
static void f8_rows(const float *x, int64_t ldx, int64_t M, const f8mat_t *W, const float *fw, int64_t r0, int nr,
                    float *y, int64_t ldy) {
    const int wide = f8_wide(), MRL = wide ? 8 : 4;
    for (int64_t m = 0; m < M; m += MRL) {
        const int mr = (int)(M - m < MRL ? M - m : MRL);
#if F8_HAVE_AVX512
        if (wide) { tile_any_avx512(mr, x + m * ldx, ldx, W, fw, r0, nr, y + m * ldy, ldy); continue; }
#endif
        tile_any_avx2(mr, x + m * ldx, ldx, W, fw, r0, nr, y + m * ldy, ldy);
    }
}

static int f8_mat(f8mat_t *W, const uint8_t *q, const float *s, int64_t N, int64_t K, int64_t bn, int64_t bk) {
    if (N < 1 || K < 1 || bn < 1 || bk < 1) return 0;
    *W = (f8mat_t){q, s, K, bn, bk, (K + bk - 1) / bk};
    return 1;
}

/* scales per matrix of N x K in blocks of bn x bk */
static int64_t f8_nscales(int64_t N, int64_t K, int64_t bn, int64_t bk) { return ((N + bn - 1) / bn) * ((K + bk - 1) / bk); }

typedef struct {
    const float *x;
    const f8mat_t *W;
    const float *bias;
    float *y;
    int64_t M, N, ldx, r0, r1;
} f8lin_job_t;

static void *f8lin_range(void *arg) {
    const f8lin_job_t *J = (const f8lin_job_t *)arg;
    const int64_t K = J->W->K;
    float *fw = J->M > f8_mr() ? (float *)malloc((size_t)(F8CH * K) * sizeof(float)) : NULL;
    for (int64_t r = J->r0; r < J->r1; r += F8CH) {
        const int nr = (int)(J->r1 - r < F8CH ? J->r1 - r : F8CH);
        if (fw) f8_convert(J->W, r, nr, fw);
        f8_rows(J->x, J->ldx, J->M, J->W, fw, r, nr, J->y + r, J->N);
        if (J->bias)
            for (int64_t m = 0; m < J->M; m++)
                for (int c = 0; c < nr; c++) J->y[m * J->N + r + c] += J->bias[r + c];
    }
    free(fw);
    return NULL;
}

/* Returns 0 on success, 3 for bad shapes. x [M, K] rows ldx apart; q [N, K]; s: see the top; y [M, N]. */
int fp8_linear_f32(const float *x, int64_t ldx, const uint8_t *q, const float *s, int64_t bn, int64_t bk,
                   const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    f8mat_t W;
    if (M < 0 || !f8_mat(&W, q, s, N, K, bn, bk)) return 3;
    if (M == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t chunks = (N + F8CH - 1) / F8CH;
    if (nthreads > chunks) nthreads = (int)chunks;
    f8lin_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        const int64_t c0 = chunks * t / nthreads, c1 = chunks * (t + 1) / nthreads;
        jobs[t] = (f8lin_job_t){x, &W, bias, y, M, N, ldx, c0 * F8CH, c1 * F8CH < N ? c1 * F8CH : N};
    }
    run_jobs(f8lin_range, jobs, sizeof jobs[0], nthreads);
    return 0;
}

/* -- experts ------------------------------------------------------------------------------------ */
typedef struct {
    int64_t k, E, H, I;
    const uint8_t *q13, *q2;
    const float *s13, *s2;
    int64_t bn13, bk13, bn2, bk2;
    const float *b13, *b2;
    int clamp;
    float alpha, limit;
    const int64_t *start, *pair;
    const float *xs; /* [P, H] expert order */
    float *act;      /* [P, I] expert order */
    float *ys;       /* [P, H] by pair index */
    float *buf;      /* the thread's scratch: g, u, y tiles and two converted chunks */
    int64_t per;     /* floats of scratch per thread */
    int phase;
    int64_t first, last;
} f8moe_job_t;

/* act[0:nr] of one row from gate g and up u (biases added already) */
static inline void f8_act(const f8moe_job_t *J, float *g, float *u, float *a, int nr) {
    if (J->clamp) {
        for (int c = 0; c < nr; c++) {
            const float gv = g[c] < J->limit ? g[c] : J->limit;
            const float uv = u[c] < -J->limit ? -J->limit : (u[c] > J->limit ? J->limit : u[c]);
            a[c] = (uv + 1.f) * (gv / (1.f + expf(-J->alpha * gv)));
        }
    } else if (nr == F8CH) {
        silu_mul16(g, u, a);
    } else {
        for (int c = 0; c < nr; c++) a[c] = g[c] / (1.f + expf(-g[c])) * u[c];
    }
}

static void f8moe_items(const f8moe_job_t *J) {
    const int64_t H = J->H, I = J->I;
    const int64_t panels = J->phase == 0 ? (I + F8CH - 1) / F8CH : (H + F8CH - 1) / F8CH;
    const int64_t K = J->phase == 0 ? H : I;
    const int MRL = f8_mr();
    float *g = J->buf, *u = g + 8 * F8CH, *y = u + 8 * F8CH, *fw = y + 8 * F8CH; /* fw: 2 * 16 rows of K */
    for (int64_t it = J->first; it < J->last; it++) {
        const int64_t e = it / panels, j = it % panels;
        const int64_t p0 = J->start[e], n = J->start[e + 1] - p0;
        if (n == 0) continue;
        f8mat_t W;
        if (J->phase == 0) {
            f8_mat(&W, J->q13 + e * 2 * I * H, J->s13 + e * f8_nscales(2 * I, H, J->bn13, J->bk13), 2 * I, H,
                   J->bn13, J->bk13);
        } else {
            f8_mat(&W, J->q2 + e * H * I, J->s2 + e * f8_nscales(H, I, J->bn2, J->bk2), H, I, J->bn2, J->bk2);
        }
        const int64_t r0 = j * F8CH, rows = J->phase == 0 ? I : H;
        const int nr = (int)(rows - r0 < F8CH ? rows - r0 : F8CH);
        const int buffered = n > MRL;
        if (buffered) {
            f8_convert(&W, r0, nr, fw);
            if (J->phase == 0) f8_convert(&W, I + r0, nr, fw + F8CH * K);
        }
        for (int64_t m = 0; m < n; m += MRL) {
            const int mr = (int)(n - m < MRL ? n - m : MRL);
            if (J->phase == 0) {
                const float *xm = J->xs + (p0 + m) * H;
                f8_rows(xm, H, mr, &W, buffered ? fw : NULL, r0, nr, g, F8CH);
                f8_rows(xm, H, mr, &W, buffered ? fw + F8CH * K : NULL, I + r0, nr, u, F8CH);
                for (int i = 0; i < mr; i++) {
                    float *gi = g + i * F8CH, *ui = u + i * F8CH;
                    if (J->b13)
                        for (int c = 0; c < nr; c++) gi[c] += J->b13[e * 2 * I + r0 + c], ui[c] += J->b13[e * 2 * I + I + r0 + c];
                    f8_act(J, gi, ui, J->act + (p0 + m + i) * I + r0, nr);
                }
            } else {
                f8_rows(J->act + (p0 + m) * I, I, mr, &W, buffered ? fw : NULL, r0, nr, y, F8CH);
                for (int i = 0; i < mr; i++) {
                    float *dst = J->ys + J->pair[p0 + m + i] * H + r0;
                    for (int c = 0; c < nr; c++) dst[c] = y[i * F8CH + c] + (J->b2 ? J->b2[e * H + r0 + c] : 0.f);
                }
            }
        }
    }
}

static void *f8moe_thread(void *arg) {
    f8moe_items((const f8moe_job_t *)arg);
    return NULL;
}

/* a phase's items (expert, 16-row chunk) split over threads, balanced by rows (+1 per item of an
 * active expert: its chunk is read); experts with no pair cost nothing */
static void f8moe_phase(f8moe_job_t *base, int phase, int nthreads) {
    const int64_t panels = phase == 0 ? (base->I + F8CH - 1) / F8CH : (base->H + F8CH - 1) / F8CH;
    f8moe_job_t jobs[MAX_THREADS];
    int64_t bounds[MAX_THREADS + 1];
    split_expert_items(base->start, base->E, panels, nthreads, bounds);
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = *base;
        jobs[t].phase = phase;
        jobs[t].buf = base->buf + t * base->per;
        jobs[t].first = bounds[t];
        jobs[t].last = bounds[t + 1];
    }
    run_jobs(f8moe_thread, jobs, sizeof jobs[0], nthreads);
}

/* Returns 0 on success, 1 when out of memory, 2 for an expert id out of range, 3 for bad shapes.
 * x [T, H]; topk_ids [T, k] int64; topk_w [T, k]; w13: q13 [E, 2I, H] (gate rows, then up rows)
 * with s13 [E, ceil(2I/bn13), ceil(H/bk13)]; w2: q2 [E, H, I] with s2 [E, ceil(H/bn2), ceil(I/bk2)];
 * b13 [E, 2I] and b2 [E, H] or NULL; clamp: gpt-oss's clamped SwiGLU (alpha, limit), else SiLU-and-mul;
 * weight_on_input: each pair's row of x scaled by its weight, the outputs summed unweighted.
 * out [T, H] (overwritten). */
int fp8_moe_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const uint8_t *q13, const float *s13,
                int64_t bn13, int64_t bk13, const uint8_t *q2, const float *s2, int64_t bn2, int64_t bk2,
                const float *b13, const float *b2, int clamp, float alpha, float limit, int weight_on_input,
                float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads) {
    if (T < 0 || k < 1 || E < 1 || H < 1 || I < 1 || bn13 < 1 || bk13 < 1 || bn2 < 1 || bk2 < 1) return 3;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t P = T * k;
    int64_t *start = (int64_t *)calloc((size_t)(E + 2), sizeof(int64_t));
    int64_t *pair = (int64_t *)malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    float *xs = (float *)malloc((size_t)(P > 0 ? P : 1) * (size_t)(2 * H + I) * sizeof(float));
    const int64_t per = 3 * 8 * F8CH + 2 * F8CH * (H > I ? H : I); /* g, u, y tiles; two converted chunks */
    float *scratch = (float *)malloc((size_t)(nthreads * per) * sizeof(float));
    int rc = 0;
    if (!start || !pair || !xs || !scratch) { rc = 1; goto done; }
    float *act = xs + P * H, *ys = act + P * I;
    for (int64_t p = 0; p < P; p++) {
        const int64_t e = topk_ids[p];
        if (e < 0 || e >= E) { rc = 2; goto done; }
        if (weight_on_input || topk_w[p] != 0.f) start[e + 2]++; /* a weighted-out pair adds nothing */
    }
    for (int64_t e = 0; e < E; e++) start[e + 2] += start[e + 1];
    for (int64_t p = 0; p < P; p++) /* stable: pairs of e in (t, s) order */
        if (weight_on_input || topk_w[p] != 0.f) pair[start[topk_ids[p] + 1]++] = p;
    for (int64_t q = 0; q < start[E]; q++) {
        const float *src = x + (pair[q] / k) * H;
        float *dst = xs + q * H;
        if (weight_on_input) {
            const float w = topk_w[pair[q]];
            for (int64_t h = 0; h < H; h++) dst[h] = src[h] * w;
        } else {
            memcpy(dst, src, (size_t)H * sizeof(float));
        }
    }
    f8moe_job_t base = {k, E, H, I, q13, q2, s13, s2, bn13, bk13, bn2, bk2, b13, b2, clamp, alpha, limit,
                        start, pair, xs, act, ys, scratch, per, 0, 0, 0};
    f8moe_phase(&base, 0, nthreads);
    f8moe_phase(&base, 1, nthreads);
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        for (int64_t h = 0; h < H; h++) o[h] = 0.f;
        for (int64_t s = 0; s < k; s++) {
            const float w = topk_w[t * k + s];
            if (!weight_on_input && w == 0.f) continue;
            const float *yp = ys + (t * k + s) * H;
            if (weight_on_input)
                for (int64_t h = 0; h < H; h++) o[h] += yp[h];
            else
                for (int64_t h = 0; h < H; h++) o[h] += w * yp[h];
        }
    }
done:
    free(start); free(pair); free(xs); free(scratch);
    return rc;
}

#else /* no AVX2 + FMA + F16C: the callers keep the PyTorch path */
int fp8_linear_f32(const float *x, int64_t ldx, const uint8_t *q, const float *s, int64_t bn, int64_t bk,
                   const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) { return 4; }
int fp8_moe_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const uint8_t *q13, const float *s13,
                int64_t bn13, int64_t bk13, const uint8_t *q2, const float *s2, int64_t bn2, int64_t bk2,
                const float *b13, const float *b2, int clamp, float alpha, float limit, int weight_on_input,
                float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads) { return 4; }
#endif
