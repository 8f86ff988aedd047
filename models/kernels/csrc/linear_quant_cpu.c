/* Linear layers over quantized weights on the CPU (int8 / int4, quant_gemm.h), and the
 * run-time choice of the instruction-set level of the quantized kernels.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias): x's rows are quantized to int8 blocks of 32 once per
 * call (with their magnitudes), then each thread takes a contiguous range of W's rows (whole
 * 16-row chunks: the split is over N, for decode and prefill alike; N has hundreds of chunks in
 * every layer but the smallest) and, 64 rows of x at a time, chunk by chunk: every 4-row tile of
 * the 64 reads the chunk's two 8-row groups as stored (the kernel order of quant_gemm.h, packed
 * at load: nothing is prepared per call), so the chunk stays in L1/L2 while the rows use it and
 * the 64 rows' int8 stay in L2 while the chunks stream by. A decode row is a tile of one row.
 *
 * Levels: AVX2 (VPMADDUBSW + VPMADDWD), AVX-512 (the same 256-bit code compiled for AVX-512VL:
 * EVEX encodings, 32 vector registers) and AVX512-VNNI (VPDPBUSD in place of VPMADDUBSW +
 * VPMADDWD), each compiled with GCC target pragmas whatever -march says, with the same tiling,
 * chosen at run time by the CPU's features (__builtin_cpu_supports) or forced lower
 * (quant_isa_set; models/kernels/quant.py reads MOE_SERVE_CPU_ISA). Their exact int32 block sums
 * are equal, so are their float32 results.
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
#define QG_VNNI 0
#include "quant_gemm_body.h"
#undef QG_NAME
#undef QG_VNNI

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define QG_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#define QG_NAME(x) x##_avx512
#define QG_VNNI 0
#include "quant_gemm_body.h"
#undef QG_NAME
#undef QG_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#define QG_NAME(x) x##_vnni
#define QG_VNNI 1
#include "quant_gemm_body.h"
#undef QG_NAME
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

void qgemm_tile(const qact_t *A, int64_t m0, int mr, const qmat_t *W, int64_t G, float *y, int64_t ldy) {
    switch (quant_isa_get()) {
#if QG_HAVE_AVX512
    case ISA_AVX512VNNI: qgemm_tile_vnni(A, m0, mr, W, G, y, ldy); return;
    case ISA_AVX512: qgemm_tile_avx512(A, m0, mr, W, G, y, ldy); return;
#endif
    default: qgemm_tile_avx2(A, m0, mr, W, G, y, ldy); return;
    }
}

int qact_alloc(qact_t *A, int64_t M, int64_t K) {
    const int64_t nb = K / QK, rows = M > 0 ? M : 1;
    A->K = K;
    A->q = (int8_t *)malloc((size_t)(2 * rows * K + 2 * rows * nb * (int64_t)sizeof(float)));
    if (!A->q) return 0;
    A->a = A->q + rows * K;
    A->d = (float *)(void *)(A->a + rows * K); /* K is a multiple of 32: aligned */
    A->s = A->d + rows * nb;
    return 1;
}

void qact_free(qact_t *A) { free(A->q); }

/* d = max|x| / 127 per block of 32, q = round(x / d) (to nearest even, as torch.round), s = d * sum(q) */
void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, qact_t *A, int64_t a0) {
    const int64_t nb = K / QK;
    const __m256 sgn = _mm256_set1_ps(-0.f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + m * ldx + b * QK;
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
            __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sgn, v0), _mm256_andnot_ps(sgn, v1)),
                                      _mm256_max_ps(_mm256_andnot_ps(sgn, v2), _mm256_andnot_ps(sgn, v3)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
            const __m256 iv = _mm256_set1_ps(id);
            const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, iv), rnd));
            const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, iv), rnd));
            const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, iv), rnd));
            const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, iv), rnd));
            /* pack to int8 in element order (packs interleave 128-bit lanes: permute back) */
            const __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
            __m256i q8 = _mm256_packs_epi16(p01, p23);
            q8 = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            const int64_t o = (a0 + m) * K + b * QK;
            _mm256_storeu_si256((__m256i *)(A->q + o), q8);
            _mm256_storeu_si256((__m256i *)(A->a + o), _mm256_abs_epi8(q8));
            const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
            A->d[(a0 + m) * nb + b] = d;
            A->s[(a0 + m) * nb + b] = d * (float)_mm_cvtsi128_si32(t);
        }
}

#define QMB 64 /* activation rows per pass over a thread's weight rows (their int8 stay in L2 meanwhile) */

typedef struct {
    const qact_t *A;
    const qmat_t *W;
    const float *bias;
    float *y;
    int64_t M, r0, r1;
} qlin_job_t;

/* rows [r0, r1) of W (whole 8-row groups) for every row of x: QMB rows of x at a time, over W's
 * rows in chunks of QTILE_N, each chunk against every QTILE_M-row tile */
static void *qlin_range(void *arg) {
    const qlin_job_t *J = (const qlin_job_t *)arg;
    const int64_t N = J->W->N;
    for (int64_t mb = 0; mb < J->M; mb += QMB) {
        const int64_t me = J->M - mb < QMB ? J->M : mb + QMB;
        for (int64_t r = J->r0; r < J->r1; r += QTILE_N) {
            const int nr = (int)(J->r1 - r < QTILE_N ? J->r1 - r : QTILE_N);
            for (int64_t m = mb; m < me; m += QTILE_M) {
                const int mr = (int)(me - m < QTILE_M ? me - m : QTILE_M);
                float *yb = J->y + m * N + r;
                for (int h = 0; h * QGROUP < nr; h++) qgemm_tile(J->A, m, mr, J->W, r / QGROUP + h, yb + h * QGROUP, N);
                if (J->bias)
                    for (int i = 0; i < mr; i++)
                        for (int c = 0; c < nr; c++) yb[i * N + c] += J->bias[r + c];
            }
        }
    }
    return NULL;
}

/* Returns 0 on success, 1 when out of memory, 3 for bad shapes. x [M, K] rows ldx apart; y [M, N]. */
int qlinear_f32(const float *x, int64_t ldx, int fmt, const uint8_t *q, const uint16_t *d, const uint16_t *mins,
                const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K % QK || N % QGROUP || M < 0 || N < 1 || fmt < QF_Q8 || fmt > QF_Q4Z || (fmt == QF_Q4Z && !mins)) return 3;
    if (M == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t chunks = (N + QTILE_N - 1) / QTILE_N;
    if (nthreads > chunks) nthreads = (int)chunks;
    qact_t A;
    if (!qact_alloc(&A, M, K)) return 1;
    quantize_rows(x, ldx, M, K, &A, 0);
    const qmat_t W = {fmt, N, K, q, d, mins};
    qlin_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        const int64_t c0 = chunks * t / nthreads, c1 = chunks * (t + 1) / nthreads;
        jobs[t] = (qlin_job_t){&A, &W, bias, y, M, c0 * QTILE_N, c1 * QTILE_N < N ? c1 * QTILE_N : N};
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
