/* Fused MoE experts over bf16 weights with float32 math on the CPU (AVX2 + FMA): the CPU expert
 * tier's bf16 format (models/placement/executor.py), and the experts of a bf16 checkpoint that
 * --dtype auto keeps in bf16 on the CPU (models/kernels/quant.py, format "bf16").
 *
 * out[t] = sum_s topk_w[t, s] * W2[e] @ (silu(G[e] @ x[t]) * (U[e] @ x[t])),  e = topk_ids[t, s]
 *
 * The weights are read where they are, in the model's own layout: w13 [E, 2I, H] and w2 [E, H, I]
 * bf16, row-major (expert e's gate row j is row e * 2I + j, its up row e * 2I + I + j), so a bf16
 * model's host copy of its experts is computed in place, with no packed copy beside it. As
 * moe_cpu.c (float32) and moe_quant_cpu.c (int8 / int4): the pairs are grouped by expert, each
 * active expert's rows of x gathered, gate and up computed 16 rows at a time for up to 4 tokens
 * with SiLU-and-mul fused, then down; each weight row is read once per call, as one sequential
 * stream. bf16 -> float32 in registers: the 16 bits zero-extended to 32 and shifted left by 16
 * (bf16 is float32's upper half), then FMAs in float32. Every output element sums its row in
 * k order whatever the batch (batch invariant). Pairs of routing weight 0 (the placement
 * executor's padding: its fixed-size buffers) are skipped: they add nothing.
 *
 * Levels, as linear_bf16_cpu.c's (`bf16_isa_get`: the best the CPU runs, MOE_SERVE_CPU_ISA forces
 * a lower one): AVX2 + FMA as above; AVX-512F (16 weights converted per instruction, one float32
 * accumulator of 16 lanes per token and weight row); AVX512-BF16 (VDPBF16PS: 32 weights per
 * instruction against the activations rounded to bf16 once per call (phase 0) and as phase 0
 * writes them (phase 1), as llama.cpp's bf16 path: this changes the math slightly). At the
 * AVX-512 levels a tile runs up to 4 tokens against 8 (1 token), 4 (2) or 2 (3-4) weight rows
 * at once, so that enough accumulators are independent; each output is one accumulator's
 * lanes summed in k order and then across lanes the same way whatever the batch (batch
 * invariant). The AVX2 path converted 16 weights in 5 instructions and ran at ~22 GB/s per
 * thread on the 2.4B model's decode (2 experts, one token), half what one thread can read.
 */
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "panel_gemm.h"

#define BCH 16 /* weight rows per item */
#define BMR 4  /* token rows per tile: 8 accumulators + 2 weight vectors */
#define BPF 512 /* bf16 elements ahead to prefetch in a row (1 KiB) */

typedef struct {
    int64_t k, E, H, I;
    const uint16_t *w13, *w2;
    const int64_t *start, *pair;
    const float *xs; /* [P, H] expert order */
    float *act;      /* [P, I] */
    float *ys;       /* [P, H] by pair index */
    const uint32_t *xs2; /* AVX512-BF16: xs in bf16 pairs [P, H/2], else NULL */
    uint32_t *act2;      /* AVX512-BF16: act in bf16 pairs [P, I/2] (phase 0 writes it), else NULL */
    int isa;
    int phase;
    int64_t first, last;
} bmoe_job_t;

/* The address BPF weights ahead of W[r, kk] for a tile of R rows starting at W (rows `ldw` apart,
 * K long): past the row's end, the same distance into row r + R, the next tile's: each tile's
 * rows start in pages the hardware prefetchers have not seen (a 2.4B-model row of H bf16 is one
 * 4 KiB page), and without this their first lines would be read cold, all R at once. Prefetches
 * never fault: past the last row they are harmless. */
static inline const char *ahead(const uint16_t *W, int64_t ldw, int64_t K, int r, int R, int64_t kk) {
    const int64_t p = kk + BPF;
    return (const char *)(p < K ? W + r * ldw + p : W + (r + R) * ldw + (p - K));
}

/* 16 bf16 -> two float32 vectors (elements 0-7, 8-15) */
static inline __attribute__((always_inline)) void bf16x16(const uint16_t *p, __m256 *lo, __m256 *hi) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
}

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define B_FMA(i)                                                                        \
    if (mr > i) {                                                                       \
        a##i##0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * ldx + kk), a##i##0);       \
        a##i##1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * ldx + kk + 8), a##i##1);   \
    }
#define B_STORE(i) \
    if (mr > i) y[i * ldy + c] = hsum8(_mm256_add_ps(a##i##0, a##i##1));

/* y[i * ldy + c] = x[i] . W[c] for i < mr <= 4, c < nr; W rows `ldw` apart, K a multiple of 16 */
static inline __attribute__((always_inline)) void btile(const int mr, const float *x, int64_t ldx, const uint16_t *W,
                                                       int64_t ldw, int64_t K, int nr, float *y, int64_t ldy) {
    for (int c = 0; c < nr; c++) {
        const uint16_t *row = W + c * ldw;
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
               a31 = a00;
        for (int64_t kk = 0; kk < K; kk += 16) {
            _mm_prefetch(ahead(W, ldw, K, c, 1, kk), _MM_HINT_T0);
            __m256 w0, w1;
            bf16x16(row + kk, &w0, &w1);
            B_FMA(0) B_FMA(1) B_FMA(2) B_FMA(3)
        }
        B_STORE(0) B_STORE(1) B_STORE(2) B_STORE(3)
    }
}

/* one token row against 4 weight rows at a time: 8 independent accumulators (one row's two would
 * wait on the FMA latency, not on memory); each output sums exactly as in `btile` */
#define R_FMA(j)                                                                        \
    bf16x16(r##j + kk, &w0, &w1);                                                       \
    a##j##0 = _mm256_fmadd_ps(w0, x0, a##j##0);                                         \
    a##j##1 = _mm256_fmadd_ps(w1, x1, a##j##1);
static inline void btile_row(const float *x, const uint16_t *W, int64_t ldw, int64_t K, int nr, float *y) {
    int c = 0;
    for (; c + 4 <= nr; c += 4) {
        const uint16_t *r0 = W + c * ldw, *r1 = r0 + ldw, *r2 = r1 + ldw, *r3 = r2 + ldw;
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
               a31 = a00;
        for (int64_t kk = 0; kk < K; kk += 16) {
            _mm_prefetch(ahead(r0, ldw, K, 0, 4, kk), _MM_HINT_T0);
            _mm_prefetch(ahead(r0, ldw, K, 1, 4, kk), _MM_HINT_T0);
            _mm_prefetch(ahead(r0, ldw, K, 2, 4, kk), _MM_HINT_T0);
            _mm_prefetch(ahead(r0, ldw, K, 3, 4, kk), _MM_HINT_T0);
            const __m256 x0 = _mm256_loadu_ps(x + kk), x1 = _mm256_loadu_ps(x + kk + 8);
            __m256 w0, w1;
            R_FMA(0) R_FMA(1) R_FMA(2) R_FMA(3)
        }
        y[c] = hsum8(_mm256_add_ps(a00, a01));
        y[c + 1] = hsum8(_mm256_add_ps(a10, a11));
        y[c + 2] = hsum8(_mm256_add_ps(a20, a21));
        y[c + 3] = hsum8(_mm256_add_ps(a30, a31));
    }
    if (c < nr) btile(1, x, 0, W + c * ldw, ldw, K, nr - c, y + c, 0);
}

static inline void btile_any(int mr, const float *x, int64_t ldx, const uint16_t *W, int64_t ldw, int64_t K, int nr,
                             float *y, int64_t ldy) {
    switch (mr) {
    case 1: btile_row(x, W, ldw, K, nr, y); break;
    case 2: btile(2, x, ldx, W, ldw, K, nr, y, ldy); break;
    case 3: btile(3, x, ldx, W, ldw, K, nr, y, ldy); break;
    default: btile(4, x, ldx, W, ldw, K, nr, y, ldy); break;
    }
}

/* -- AVX-512F and AVX512-BF16 ----------------------------------------------------------------- */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define BM_HAVE_AVX512 1
enum { BM_AVX512 = 2, BM_AVX512BF16 = 4 }; /* bf16_isa_get() levels (linear_bf16_cpu.c) */
#define RMAX 8

/* rows at once for a tile of mr tokens: 8 accumulators (6 for 3 tokens) */
static inline int tile_rows(int mr) { return mr == 1 ? 8 : mr == 2 ? 4 : 2; }

/* y[i * ldy + r] = x[i] . W[r] for i < mr <= 4, r < R; W rows `ldw` apart; K a multiple of 16 */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) void zrows(
    const int mr, const int R, const float *x, int64_t ldx, const uint16_t *W, int64_t ldw, int64_t K, float *y,
    int64_t ldy) {
    __m512 z[BMR][RMAX];
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) z[i][r] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < K; kk += 16) {
        __m512 w[RMAX];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint16_t *q = W + r * ldw + kk;
            _mm_prefetch(ahead(W, ldw, K, r, R, kk), _MM_HINT_T0);
            w[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)q)), 16));
        }
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            const __m512 a = _mm512_loadu_ps(x + i * ldx + kk);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) z[i][r] = _mm512_fmadd_ps(w[r], a, z[i][r]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) y[i * ldy + r] = _mm512_reduce_add_ps(z[i][r]);
}

/* the same over bf16 pairs: x2 rows `ldx2` uint32 apart; 32 weights per step, a 16-weight tail
 * (K = 16 mod 32) with its other half masked to 0 */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __attribute__((always_inline)) void
drows(const int mr, const int R, const uint32_t *x2, int64_t ldx2, const uint16_t *W, int64_t ldw, int64_t K,
      float *y, int64_t ldy) {
    __m512 z[BMR][RMAX];
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) z[i][r] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + 32 <= K; kk += 32) {
        __m512bh w[RMAX];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint16_t *q = W + r * ldw + kk;
            _mm_prefetch(ahead(W, ldw, K, r, R, kk), _MM_HINT_T0);
            w[r] = (__m512bh)_mm512_loadu_si512((const void *)q);
        }
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            const __m512bh a = (__m512bh)_mm512_loadu_si512((const void *)(x2 + i * ldx2 + kk / 2));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) z[i][r] = _mm512_dpbf16_ps(z[i][r], a, w[r]);
        }
    }
    if (kk < K) {
        __m512bh w[RMAX];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(0xFFFFu, (const void *)(W + r * ldw + kk));
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            const __m512bh a = (__m512bh)_mm512_maskz_loadu_epi32(0x00FF, (const void *)(x2 + i * ldx2 + kk / 2));
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) z[i][r] = _mm512_dpbf16_ps(z[i][r], a, w[r]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) y[i * ldy + r] = _mm512_reduce_add_ps(z[i][r]);
}

#define ROWS_CASES(F, ...)                                                  \
    switch (mr) {                                                           \
    case 1: for (int c = 0; c < nr; c += 8) F(1, 8, __VA_ARGS__); break;    \
    case 2: for (int c = 0; c < nr; c += 4) F(2, 4, __VA_ARGS__); break;    \
    case 3: for (int c = 0; c < nr; c += 2) F(3, 2, __VA_ARGS__); break;    \
    default: for (int c = 0; c < nr; c += 2) F(4, 2, __VA_ARGS__); break;   \
    }

/* mr <= 4 tokens against nr (a multiple of 8) weight rows */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void ztile_any(int mr, const float *x, int64_t ldx,
                                                                           const uint16_t *W, int64_t ldw, int64_t K,
                                                                           int nr, float *y, int64_t ldy) {
    ROWS_CASES(zrows, x, ldx, W + c * ldw, ldw, K, y + c, ldy)
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void dtile_any(
    int mr, const uint32_t *x2, int64_t ldx2, const uint16_t *W, int64_t ldw, int64_t K, int nr, float *y, int64_t ldy) {
    ROWS_CASES(drows, x2, ldx2, W + c * ldw, ldw, K, y + c, ldy)
}
#else
#define BM_HAVE_AVX512 0
#endif

/* mr tokens (rows of x, or of x2 in bf16 pairs at the AVX512-BF16 level) against 16 weight rows */
static inline void tile16(const bmoe_job_t *J, int mr, const float *x, const uint32_t *x2, int64_t ldx,
                          const uint16_t *W, int64_t ldw, int64_t K, float *y) {
#if BM_HAVE_AVX512
    if (J->isa == BM_AVX512BF16) {
        dtile_any(mr, x2, ldx / 2, W, ldw, K, BCH, y, BCH);
        return;
    }
    if (J->isa == BM_AVX512) {
        ztile_any(mr, x, ldx, W, ldw, K, BCH, y, BCH);
        return;
    }
#endif
    (void)x2;
    btile_any(mr, x, ldx, W, ldw, K, BCH, y, BCH);
}

static void bmoe_items(const bmoe_job_t *J) {
    const int64_t H = J->H, I = J->I;
    const int64_t panels = J->phase == 0 ? I / BCH : H / BCH;
    float g[BMR * BCH], u[BMR * BCH], y[BMR * BCH];
    for (int64_t it = J->first; it < J->last; it++) {
        const int64_t e = it / panels, j = it % panels;
        const int64_t p0 = J->start[e], n = J->start[e + 1] - p0;
        for (int64_t m = 0; m < n; m += BMR) {
            const int mr = (int)(n - m < BMR ? n - m : BMR);
            if (J->phase == 0) {
                const float *xm = J->xs + (p0 + m) * H;
                const uint32_t *xm2 = J->xs2 ? J->xs2 + (p0 + m) * (H / 2) : NULL;
                tile16(J, mr, xm, xm2, H, J->w13 + (e * 2 * I + j * BCH) * H, H, H, g);
                tile16(J, mr, xm, xm2, H, J->w13 + (e * 2 * I + I + j * BCH) * H, H, H, u);
                for (int i = 0; i < mr; i++) {
                    float *a = J->act + (p0 + m + i) * I + j * BCH;
                    silu_mul16(g + i * BCH, u + i * BCH, a);
                    if (J->act2) /* the next phase's operand: bf16 pairs */
                        bf16_pairs(a, BCH, 1, BCH, J->act2 + (p0 + m + i) * (I / 2) + j * BCH / 2);
                }
            } else {
                tile16(J, mr, J->act + (p0 + m) * I, J->act2 ? J->act2 + (p0 + m) * (I / 2) : NULL, I,
                       J->w2 + (e * H + j * BCH) * I, I, I, y);
                for (int i = 0; i < mr; i++)
                    memcpy(J->ys + J->pair[p0 + m + i] * H + j * BCH, y + i * BCH, BCH * sizeof(float));
            }
        }
    }
}

static void *bmoe_thread(void *arg) {
    bmoe_items((const bmoe_job_t *)arg);
    return NULL;
}

/* a phase's items (expert, 16-row chunk) split over threads, balanced by rows (+1 per item: the
 * chunk is read); experts with no pair cost nothing and are skipped */
static void bmoe_phase(bmoe_job_t *base, int phase, int nthreads) {
    const int64_t panels = phase == 0 ? base->I / BCH : base->H / BCH;
    bmoe_job_t jobs[MAX_THREADS];
    int64_t bounds[MAX_THREADS + 1];
    split_expert_items(base->start, base->E, panels, nthreads, bounds);
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = *base;
        jobs[t].phase = phase;
        jobs[t].first = bounds[t];
        jobs[t].last = bounds[t + 1];
    }
    run_jobs(bmoe_thread, jobs, sizeof jobs[0], nthreads);
}

/* Returns 0 on success, 1 when out of memory, 2 for an expert id out of range, 3 for bad shapes.
 * x [T, H] float32; topk_ids [T, k] int64; topk_w [T, k] float32; w13 [E, 2I, H], w2 [E, H, I]
 * bf16 (as uint16); out [T, H] (overwritten). H and I multiples of 16. */
int moe_fused_bf16(const float *x, const int64_t *topk_ids, const float *topk_w, const uint16_t *w13,
                   const uint16_t *w2, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                   int nthreads) {
    if (H % BCH || I % BCH || T < 0 || k < 1 || E < 1) return 3;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t P = T * k;
    int64_t *start = (int64_t *)calloc((size_t)(E + 2), sizeof(int64_t));
    int64_t *pair = (int64_t *)malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    float *xs = (float *)malloc((size_t)(P > 0 ? P : 1) * (size_t)(2 * H + I) * sizeof(float));
    const int isa = bf16_isa_get();
    /* AVX512-BF16: the activations in bf16 pairs, x's rows and then act's */
    uint32_t *x2 = isa == 4 ? (uint32_t *)malloc((size_t)(P > 0 ? P : 1) * (size_t)(H + I) / 2 * sizeof(uint32_t)) : NULL;
    int rc = 0;
    if (!start || !pair || !xs || (isa == 4 && !x2)) { rc = 1; goto done; }
    float *act = xs + P * H, *ys = act + P * I;
    for (int64_t p = 0; p < P; p++) {
        const int64_t e = topk_ids[p];
        if (e < 0 || e >= E) { rc = 2; goto done; }
        if (topk_w[p] != 0.f) start[e + 2]++; /* a pair of weight 0 adds nothing: not computed */
    }
    for (int64_t e = 0; e < E; e++) start[e + 2] += start[e + 1];
    for (int64_t p = 0; p < P; p++) /* stable: pairs of e in (t, s) order */
        if (topk_w[p] != 0.f) pair[start[topk_ids[p] + 1]++] = p;
    for (int64_t q = 0; q < start[E]; q++) memcpy(xs + q * H, x + (pair[q] / k) * H, (size_t)H * sizeof(float));
    if (x2) bf16_pairs(xs, H, start[E], H, x2);
    bmoe_job_t base = {k, E, H, I, w13, w2, start, pair, xs, act, ys, x2, x2 ? x2 + P * (H / 2) : NULL, isa, 0, 0, 0};
    bmoe_phase(&base, 0, nthreads);
    bmoe_phase(&base, 1, nthreads);
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        for (int64_t h = 0; h < H; h += 8) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t s = 0; s < k; s++)
                if (topk_w[t * k + s] != 0.f)
                    a = _mm256_fmadd_ps(_mm256_set1_ps(topk_w[t * k + s]), _mm256_loadu_ps(ys + (t * k + s) * H + h), a);
            _mm256_storeu_ps(o + h, a);
        }
    }
done:
    free(start); free(pair); free(xs); free(x2);
    return rc;
}

#else
int moe_fused_bf16(const float *x, const int64_t *topk_ids, const float *topk_w, const uint16_t *w13,
                   const uint16_t *w2, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                   int nthreads) { return 4; }
#endif
