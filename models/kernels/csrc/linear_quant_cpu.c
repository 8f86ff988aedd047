/* Linear layers over quantized weights on the CPU (int8 / int4, quant_gemm.h), and the
 * run-time choice of the instruction-set level of the quantized kernels.
 *
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias): x's rows are quantized to int8 blocks of 32 once per
 * call (with their magnitudes), then each thread takes a contiguous range of W's rows (whole
 * 16-row panels: the split is over N, for decode and prefill alike; N has hundreds of panels in
 * every layer but the smallest) and, 64 rows of x at a time, panel by panel: the panel is
 * prepared once (qpanel_prepare: int4 unpacked, k4-interleaved) and every 4-row tile of the 64
 * applied to it (quant_gemm_body.h), so the panel stays in L1/L2 while the rows use it and the 64
 * rows' int8 stay in L2 while the panels stream by. Calls of 1-2 rows (decode) skip the panel:
 * qgemm_row reads W's rows as they are and computes the same bits.
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

void qgemm_tile(const qact_t *A, int64_t m0, int mr, const qpanel_t *P, float *y, int64_t ldy) {
    switch (quant_isa_get()) {
#if QG_HAVE_AVX512
    case ISA_AVX512VNNI: qgemm_tile_vnni(A, m0, mr, P, y, ldy); return;
    case ISA_AVX512: qgemm_tile_avx512(A, m0, mr, P, y, ldy); return;
#endif
    default: qgemm_tile_avx2(A, m0, mr, P, y, ldy); return;
    }
}

/* r[c] = row c's block (dword g: its k 4g..4g+3) -> dst + 64 g = [r[0].g, ..., r[7].g] (and |.| into adst) */
static inline void panel_transpose8(const __m256i *r, int8_t *dst, int8_t *adst) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u[8] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3),
                          _mm256_unpackhi_epi64(t1, t3), _mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6),
                          _mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7)};
    for (int g = 0; g < 4; g++) {
        const __m256i lo = _mm256_permute2x128_si256(u[g], u[g + 4], 0x20), hi = _mm256_permute2x128_si256(u[g], u[g + 4], 0x31);
        _mm256_storeu_si256((__m256i *)(dst + 64 * g), lo);
        _mm256_storeu_si256((__m256i *)(dst + 64 * (g + 4)), hi);
        if (adst) {
            _mm256_storeu_si256((__m256i *)(adst + 64 * g), _mm256_abs_epi8(lo));
            _mm256_storeu_si256((__m256i *)(adst + 64 * (g + 4)), _mm256_abs_epi8(hi));
        }
    }
}

void qgemm_row(const qact_t *A, int64_t m, const qmat_t *W, int64_t r0, int nr, float *y) {
    switch (quant_isa_get()) {
#if QG_HAVE_AVX512
    case ISA_AVX512VNNI: qgemm_row_vnni(A, m, W, r0, nr, y); return;
    case ISA_AVX512: qgemm_row_avx512(A, m, W, r0, nr, y); return;
#endif
    default: qgemm_row_avx2(A, m, W, r0, nr, y); return;
    }
}

void qpanel_prepare(const qmat_t *W, int64_t r0, int nr, void *buf, qpanel_t *P) {
    const int64_t K = W->K, nb = K / QK, S = W->fmt == QF_Q8C ? 1 : nb;
    const int q4 = W->fmt >= QF_Q4;
    P->fmt = W->fmt, P->nr = nr, P->K = K;
    P->w = (int8_t *)buf;
    P->a = P->w + QTILE_N * K;
    P->sc = (float *)(void *)(P->a + QTILE_N * K);
    P->mn = P->sc + nb * QTILE_N;
    const __m256i lo = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++)
        for (int h = 0; h < 2; h++) {
            __m256i r[8];
            for (int c = 0; c < 8; c++) {
                const int64_t row = r0 + h * 8 + c;
                /* the same spot of the next panel (rows are read block by block, across the panel) */
                _mm_prefetch((const char *)(W->q + (row + QTILE_N) * qrow_bytes(W->fmt, K) + b * (q4 ? QK / 2 : QK)), _MM_HINT_T0);
                if (h * 8 + c >= nr) r[c] = _mm256_setzero_si256();
                else if (!q4) r[c] = _mm256_loadu_si256((const __m256i *)(W->q + row * K + b * QK));
                else {
                    const __m128i t = _mm_loadu_si128((const __m128i *)(W->q + row * (K / 2) + b * (QK / 2)));
                    r[c] = _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1), lo);
                }
            }
            const int64_t o = b * QK * QTILE_N + h * 32;
            panel_transpose8(r, P->w + o, NULL);
        }
    for (int c = 0; c < QTILE_N; c++) {
        const int64_t row = r0 + c;
        for (int64_t b = 0; b < nb; b++) {
            const float d = c < nr ? _cvtsh_ss(W->d[row * S + (S == 1 ? 0 : b)]) : 0.f;
            P->sc[b * QTILE_N + c] = d;
            P->mn[b * QTILE_N + c] = c >= nr ? 0.f : W->fmt == QF_Q4 ? -8.f * d : W->fmt == QF_Q4Z ? _cvtsh_ss(W->m[row * nb + b]) : 0.f;
        }
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
    char *buf; /* qpanel_bytes(K) */
    int64_t M, r0, r1;
} qlin_job_t;

/* rows [r0, r1) of W for every row of x: QMB rows of x at a time, over W's rows in chunks of
 * QTILE_N (int4 unpacked once per chunk and pass), each chunk against every QTILE_M-row tile */
static void *qlin_range(void *arg) {
    const qlin_job_t *J = (const qlin_job_t *)arg;
    const int64_t N = J->W->N;
    for (int64_t mb = 0; mb < J->M; mb += QMB) {
        const int64_t me = J->M - mb < QMB ? J->M : mb + QMB;
        for (int64_t r = J->r0; r < J->r1; r += QTILE_N) {
            const int nr = (int)(J->r1 - r < QTILE_N ? J->r1 - r : QTILE_N);
            if (J->M <= QROW_MAX) { /* decode: no panel */
                for (int64_t m = mb; m < me; m++) {
                    qgemm_row(J->A, m, J->W, r, nr, J->y + m * N + r);
                    if (J->bias)
                        for (int c = 0; c < nr; c++) J->y[m * N + r + c] += J->bias[r + c];
                }
                continue;
            }
            qpanel_t P;
            qpanel_prepare(J->W, r, nr, J->buf, &P);
            for (int64_t m = mb; m < me; m += QTILE_M) {
                const int mr = (int)(me - m < QTILE_M ? me - m : QTILE_M);
                float *yb = J->y + m * N + r;
                qgemm_tile(J->A, m, mr, &P, yb, N);
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
    if (K % QK || M < 0 || N < 1 || fmt < QF_Q8 || fmt > QF_Q4Z || (fmt == QF_Q4Z && !mins)) return 3;
    if (M == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t chunks = (N + QTILE_N - 1) / QTILE_N;
    if (nthreads > chunks) nthreads = (int)chunks;
    qact_t A;
    char *buf = (char *)malloc((size_t)(nthreads * qpanel_bytes(K)));
    if (!buf || !qact_alloc(&A, M, K)) {
        free(buf);
        return 1;
    }
    quantize_rows(x, ldx, M, K, &A, 0);
    const qmat_t W = {fmt, N, K, q, d, mins};
    qlin_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++) {
        const int64_t c0 = chunks * t / nthreads, c1 = chunks * (t + 1) / nthreads;
        jobs[t] = (qlin_job_t){&A, &W, bias, y, buf + t * qpanel_bytes(K), M, c0 * QTILE_N,
                               c1 * QTILE_N < N ? c1 * QTILE_N : N};
    }
    run_jobs(qlin_range, jobs, sizeof jobs[0], nthreads);
    qact_free(&A);
    free(buf);
    return 0;
}

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int quant_isa_best(void) { return 0; }
int quant_isa_set(int level) { return -1; }
int quant_isa_get(void) { return 0; }
int qlinear_f32(const float *x, int64_t ldx, int fmt, const uint8_t *q, const uint16_t *d, const uint16_t *mins,
                const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nthreads) { return 4; }
#endif
