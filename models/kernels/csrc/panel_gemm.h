/* Panel micro-kernels shared by the CPU GEMM kernels (float32, AVX2 + FMA).
 *
 * A weight [N, K] is packed as panels of 16 output rows stored k-major: [N/16, K, 16], so a
 * panel is one contiguous run that the kernels stream once (prefetching ahead), while up to
 * MR rows of the input stay in registers' reach. Each output element sums over k in order,
 * whatever the other rows of the batch: results are batch invariant.
 */
#ifndef MOE_SERVE_PANEL_GEMM_H
#define MOE_SERVE_PANEL_GEMM_H
#include <immintrin.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NR 16 /* panel width (two AVX registers) */
#define MR 6  /* token rows per micro-kernel call: 12 accumulators + 2 panel loads + 1 broadcast */
#define PF_AHEAD 1024 /* floats ahead to prefetch within a panel stream (4 KiB) */

/* y[i, 0:16] = sum_k x[i, k] * P[k, 0:16], i < mr; x rows `ldx` apart, y rows `ldy` apart.
 * The accumulators are named variables, not an array: with an array GCC kept a copy of every
 * accumulator on the stack, one store per FMA, which halved the speed. */
#define ROW_FMA(i)                                                      \
    if (mr > i) {                                                       \
        const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);          \
        c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                      \
        c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                      \
    }
#define ROW_STORE(i)                                                    \
    if (mr > i) {                                                       \
        _mm256_storeu_ps(y + i * ldy, c##i##0);                         \
        _mm256_storeu_ps(y + i * ldy + 8, c##i##1);                     \
    }
static inline __attribute__((always_inline)) void micro(const int mr, const float *x, int64_t ldx,
                                                       const float *P, int64_t K, float *y, int64_t ldy) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < K; k++) {
        const float *p = P + k * NR;
        _mm_prefetch((const char *)(p + PF_AHEAD), _MM_HINT_T0); /* one 64-byte line per k */
        const __m256 b0 = _mm256_loadu_ps(p), b1 = _mm256_loadu_ps(p + 8);
        ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3) ROW_FMA(4) ROW_FMA(5)
    }
    ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5)
}

static inline void micro_any(int mr, const float *x, int64_t ldx, const float *P, int64_t K, float *y, int64_t ldy) {
    switch (mr) {
    case 1: micro(1, x, ldx, P, K, y, ldy); break;
    case 2: micro(2, x, ldx, P, K, y, ldy); break;
    case 3: micro(3, x, ldx, P, K, y, ldy); break;
    case 4: micro(4, x, ldx, P, K, y, ldy); break;
    case 5: micro(5, x, ldx, P, K, y, ldy); break;
    default: micro(6, x, ldx, P, K, y, ldy); break;
    }
}

/* Two panels at once (two memory streams): y0[i] = x[i] . P0, y1[i] = x[i] . P1, i < mr <= 2. */
#define MR2 2 /* 8 accumulators + 4 panel loads + 1 broadcast: 3 rows would spill */
#define ROW_FMA2(i)                                                     \
    if (mr > i) {                                                       \
        const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);          \
        g##i##0 = _mm256_fmadd_ps(a, b0, g##i##0);                      \
        g##i##1 = _mm256_fmadd_ps(a, b1, g##i##1);                      \
        u##i##0 = _mm256_fmadd_ps(a, d0, u##i##0);                      \
        u##i##1 = _mm256_fmadd_ps(a, d1, u##i##1);                      \
    }
#define ROW_STORE2(i)                                                   \
    if (mr > i) {                                                       \
        _mm256_storeu_ps(y0 + i * ldy, g##i##0);                        \
        _mm256_storeu_ps(y0 + i * ldy + 8, g##i##1);                    \
        _mm256_storeu_ps(y1 + i * ldy, u##i##0);                        \
        _mm256_storeu_ps(y1 + i * ldy + 8, u##i##1);                    \
    }
static inline __attribute__((always_inline)) void micro2(const int mr, const float *x, int64_t ldx, const float *P0,
                                                        const float *P1, int64_t K, float *y0, float *y1, int64_t ldy) {
    __m256 g00 = _mm256_setzero_ps(), g01 = g00, g10 = g00, g11 = g00;
    __m256 u00 = g00, u01 = g00, u10 = g00, u11 = g00;
    for (int64_t k = 0; k < K; k++) {
        const float *p = P0 + k * NR, *q = P1 + k * NR;
        _mm_prefetch((const char *)(p + PF_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + PF_AHEAD), _MM_HINT_T0);
        const __m256 b0 = _mm256_loadu_ps(p), b1 = _mm256_loadu_ps(p + 8);
        const __m256 d0 = _mm256_loadu_ps(q), d1 = _mm256_loadu_ps(q + 8);
        ROW_FMA2(0) ROW_FMA2(1)
    }
    ROW_STORE2(0) ROW_STORE2(1)
}

static inline void micro2_any(int mr, const float *x, int64_t ldx, const float *P0, const float *P1, int64_t K,
                              float *y0, float *y1, int64_t ldy) {
    if (mr == 1) micro2(1, x, ldx, P0, P1, K, y0, y1, ldy);
    else micro2(2, x, ldx, P0, P1, K, y0, y1, ldy);
}


/* exp on 8 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (rel. err ~2e-7) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* a[0:16] = silu(g) * u */
static inline void silu_mul16(const float *g, const float *u, float *a) {
    for (int h = 0; h < NR; h += 8) {
        const __m256 gv = _mm256_loadu_ps(g + h), uv = _mm256_loadu_ps(u + h);
        const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(a + h, _mm256_mul_ps(_mm256_div_ps(gv, den), uv));
    }
}


/* Pack W [N, K] (rows `ldw` apart) into panels [N/16, K, 16]; N a multiple of 16. */
static inline void pack_panels(const float *W, int64_t ldw, int64_t N, int64_t K, float *dst) {
    for (int64_t j = 0; j < N / NR; j++)
        for (int64_t c = 0; c < NR; c++) {
            const float *src = W + (j * NR + c) * ldw;
            float *d = dst + j * K * NR + c;
            for (int64_t kk = 0; kk < K; kk++) d[kk * NR] = src[kk];
        }
}

/* float32 -> bf16, round to nearest even (NaN kept a NaN): what VCVTNEPS2BF16 does */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

/* rows x [M, K] (`ldx` apart) -> bf16 pairs x2 [M, ceil(K/2)]: (k, k + 1) in one uint32, k in the
 * low half (the operand layout of VDPBF16PS); an odd K's last pair has 0 in its high half */
static inline void bf16_pairs(const float *x, int64_t ldx, int64_t M, int64_t K, uint32_t *x2) {
    const int64_t K2 = (K + 1) / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k2 = 0; k2 < K2; k2++) {
            const uint32_t lo = to_bf16(x[m * ldx + 2 * k2]);
            const uint32_t up = 2 * k2 + 1 < K ? to_bf16(x[m * ldx + 2 * k2 + 1]) : 0;
            x2[m * K2 + k2] = lo | (up << 16);
        }
}

#define MAX_THREADS 64

typedef void *(*job_fn_t)(void *);

/* Run fn(jobs + t * size) for t < n (n <= MAX_THREADS): on PyTorch's OpenMP pool when built
 * with -fopenmp (cpu_build.py does so only where PyTorch's runtime is the libgomp.so.1 this
 * library binds to: one pool, warm, no second set of threads spinning beside it); otherwise
 * job 0 on the calling thread and the others on pthreads (inline where one cannot start). */
static inline void run_jobs(job_fn_t fn, void *jobs, size_t size, int n) {
    char *base = (char *)jobs;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int t = 0; t < n; t++) fn(base + (size_t)t * size);
#else
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < n; t++) started[t] = pthread_create(&tids[t], NULL, fn, base + (size_t)t * size) == 0;
    for (int t = 1; t < n; t++)
        if (!started[t]) fn(base + (size_t)t * size);
    fn(base);
    for (int t = 1; t < n; t++)
        if (started[t]) pthread_join(tids[t], NULL);
#endif
}

/* Split an experts phase's items (expert e, panel j: item e * panels + j) over n threads (n <=
 * MAX_THREADS), balanced by cost: an item costs its expert's rows + 1 (the panel is read), an
 * item of an expert with no rows nothing (the kernels skip it). Thread t takes the items
 * bounds[t] .. bounds[t + 1] - 1; start[e] .. start[e + 1] - 1 are expert e's rows. */
static inline void split_expert_items(const int64_t *start, int64_t E, int64_t panels, int n, int64_t *bounds) {
    int64_t active = 0;
    for (int64_t e = 0; e < E; e++) active += start[e + 1] > start[e];
    const int64_t items = E * panels, total = (start[E] + active) * panels;
    int64_t it = 0, acc = 0;
    bounds[0] = 0;
    for (int t = 0; t < n; t++) {
        const int64_t target = total * (t + 1) / n;
        while (it < items && (t == n - 1 || acc < target)) {
            const int64_t rows = start[it / panels + 1] - start[it / panels];
            acc += rows ? rows + 1 : 0;
            it++;
        }
        bounds[t + 1] = it;
    }
}

#endif
