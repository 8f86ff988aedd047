/* Linear layers over quantized weights on the CPU (int8 / int4, quant_gemm.h), and the
 * run-time choice of the instruction-set level of the quantized kernels.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias): x's rows are quantized to int8 blocks of 32 once per
 * call, then each thread takes a contiguous range of W's rows (a multiple of 16) and, chunk by
 * chunk of 16 rows, applies every 4-row tile of x to them (the chunk stays in cache while M is
 * large: prefill-sized batches read the weight once per chunk, not once per row of x).
 *
 * Levels: AVX2 (VPMADDUBSW + VPMADDWD, as llama.cpp's Q8_0 x Q8_0), AVX-512 (two blocks per
 * 512-bit step) and AVX512-VNNI (VPDPBUSD), each compiled with GCC target pragmas whatever
 * -march says, chosen at run time by the CPU's features (__builtin_cpu_supports) or forced lower
 * (quant_isa_set; models/kernels/quant.py reads MOE_SERVE_CPU_ISA).
 */
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "panel_gemm.h"
#include "quant_gemm.h"

#define QG_NAME(x) x##_avx2
#define QG_WIDE 0
#define QG_VNNI 0
#include "quant_gemm_body.h"
#undef QG_NAME
#undef QG_WIDE
#undef QG_VNNI

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define QG_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#define QG_NAME(x) x##_avx512
#define QG_WIDE 1
#define QG_VNNI 0
#include "quant_gemm_body.h"
#undef QG_NAME
#undef QG_WIDE
#undef QG_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#define QG_NAME(x) x##_vnni
#define QG_WIDE 1
#define QG_VNNI 1
#include "quant_gemm_body.h"
#undef QG_NAME
#undef QG_WIDE
#undef QG_VNNI
#pragma GCC pop_options
#else
#define QG_HAVE_AVX512 0
#endif

static int g_isa = 0; /* 0: not chosen yet */

int quant_isa_best(void) {
#if QG_HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        return __builtin_cpu_supports("avx512vnni") ? ISA_AVX512VNNI : ISA_AVX512;
    }
#endif
    return ISA_AVX2;
}

int quant_isa_set(int level) {
    const int best = quant_isa_best();
    if (level == 0) level = best;
    if (level < ISA_AVX2 || level > best) return -1;
    g_isa = level;
    return level;
}

int quant_isa_get(void) {
    if (g_isa == 0) g_isa = quant_isa_best();
    return g_isa;
}

void qgemm_tile(const qact_t *A, int64_t m0, int mr, const qmat_t *W, int64_t r0, int nr, float *y, int64_t ldy) {
    switch (quant_isa_get()) {
#if QG_HAVE_AVX512
    case ISA_AVX512VNNI: qgemm_tile_vnni(A, m0, mr, W, r0, nr, y, ldy); return;
    case ISA_AVX512: qgemm_tile_avx512(A, m0, mr, W, r0, nr, y, ldy); return;
#endif
    default: qgemm_tile_avx2(A, m0, mr, W, r0, nr, y, ldy); return;
    }
}

int qact_alloc(qact_t *A, int64_t M, int64_t K) {
    const int64_t nb = K / QK, rows = M > 0 ? M : 1;
    A->K = K;
    A->q = (int8_t *)malloc((size_t)(rows * K + 2 * rows * nb * (int64_t)sizeof(float)));
    if (!A->q) return 0;
    A->d = (float *)(void *)(A->q + rows * K + ((-(rows * K)) & 3)); /* K is a multiple of 32: aligned */
    A->s = A->d + rows * nb;
    return 1;
}

void qact_free(qact_t *A) { free(A->q); }

/* d = max|x| / 127 per block of 32, q = round(x / d) (to nearest even, as torch.round), s = d * sum(q) */
void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, qact_t *A) {
    const int64_t nb = K / QK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + m * ldx + b * QK;
            float amax = 0.f;
            for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(v[i]));
            const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
            int8_t *q = A->q + m * K + b * QK;
            int sum = 0;
            for (int i = 0; i < QK; i++) {
                const int qi = (int)nearbyintf(v[i] * id);
                q[i] = (int8_t)qi;
                sum += qi;
            }
            A->d[m * nb + b] = d;
            A->s[m * nb + b] = d * (float)sum;
        }
}

#define QCHUNK 16 /* weight rows per chunk */
#define QMR 4     /* activation rows per tile */

typedef struct {
    const qact_t *A;
    const qmat_t *W;
    const float *bias;
    float *y;
    int64_t M, r0, r1;
} qlin_job_t;

static void *qlin_range(void *arg) {
    const qlin_job_t *J = (const qlin_job_t *)arg;
    const int64_t N = J->W->N;
    for (int64_t r = J->r0; r < J->r1; r += QCHUNK) {
        const int nr = (int)(J->r1 - r < QCHUNK ? J->r1 - r : QCHUNK);
        for (int64_t m = 0; m < J->M; m += QMR) {
            const int mr = (int)(J->M - m < QMR ? J->M - m : QMR);
            float *yb = J->y + m * N + r;
            qgemm_tile(J->A, m, mr, J->W, r, nr, yb, N);
            if (J->bias)
                for (int i = 0; i < mr; i++)
                    for (int c = 0; c < nr; c++) yb[i * N + c] += J->bias[r + c];
        }
    }
    return NULL;
}

/* Returns 0 on success, 1 when out of memory, 3 for bad shapes. x [M, K] rows ldx apart; y [M, N]. */
int qlinear_f32(const float *x, int64_t ldx, int fmt, const uint8_t *q, const uint16_t *d, const uint16_t *mins,
                const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K % QK || M < 0 || N < 1 || fmt < QF_Q8 || fmt > QF_Q4Z || (fmt == QF_Q4Z && !mins)) return 3;
    if (M == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t chunks = (N + QCHUNK - 1) / QCHUNK;
    if (nthreads > chunks) nthreads = (int)chunks;
    qact_t A;
    if (!qact_alloc(&A, M, K)) return 1;
    quantize_rows(x, ldx, M, K, &A);
    const qmat_t W = {fmt, N, K, q, d, mins};
    qlin_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        const int64_t c0 = chunks * t / nthreads, c1 = chunks * (t + 1) / nthreads;
        jobs[t] = (qlin_job_t){&A, &W, bias, y, M, c0 * QCHUNK, c1 * QCHUNK < N ? c1 * QCHUNK : N};
    }
    run_jobs(qlin_range, jobs, sizeof jobs[0], nthreads);
    qact_free(&A);
    return 0;
}

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int quant_isa_best(void) { return 0; }
int quant_isa_set(int level) { return -1; }
int quant_isa_get(void) { return 0; }
int qlinear_f32(const float *x, int64_t ldx, int fmt, const uint8_t *q, const uint16_t *d, const uint16_t *mins,
                const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) { return 4; }
#endif
