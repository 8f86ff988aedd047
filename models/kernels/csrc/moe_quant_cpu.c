/* Fused MoE experts over quantized weights on the CPU (int8 / int4, quant_gemm.h).
 *
 * out[t] = sum_s topk_w[t, s] * W2[e] @ (silu(G[e] @ x[t]) * (U[e] @ x[t])),  e = topk_ids[t, s]
 *
 * As moe_cpu.c (the float32 kernel): the pairs are grouped by expert, each active expert's rows
 * of x gathered (here quantized to int8 blocks of 32 once per call), gate and up computed 16
 * rows at a time with SiLU-and-mul fused, the activations quantized, then down; each weight is
 * read once per call. An item (expert, 16 weight rows) prepares its panels once (quant_gemm.h)
 * and runs every 4-row tile of the expert's tokens over them: in prefill each expert has hundreds
 * of rows, so the dot products run as a GEMM; an expert with 1-2 tokens (decode) reads its rows
 * as they are (qgemm_row, the same bits). The weights: w13 [E, 2I, H] and w2 [E, H, I] in a quantized format, as
 * row-major rows (expert e's gate row j is row e * 2I + j, its up row e * 2I + I + j). Every
 * output element sums its blocks in k order whatever the batch (batch invariant). Pairs of
 * routing weight 0 (the placement executor's padding) are skipped: they add nothing.
 */
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "panel_gemm.h"
#include "quant_gemm.h"

#define QCH QTILE_N /* weight rows per item */
#define QMR QTILE_M

typedef struct {
    int64_t k, E, H, I;
    const qmat_t *W13, *W2;
    const int64_t *start, *pair;
    const qact_t *xs; /* [P, H] quantized, expert order */
    float *act;       /* [P, I] */
    const qact_t *as; /* [P, I] quantized act */
    float *ys;        /* [P, H] by pair index */
    int phase;
    int64_t first, last;
} qmoe_job_t;

static void qmoe_items(const qmoe_job_t *J) {
    const int64_t H = J->H, I = J->I;
    const int64_t panels = J->phase == 0 ? I / QCH : H / QCH;
    float g[QMR * QCH], u[QMR * QCH], y[QMR * QCH];
    for (int64_t it = J->first; it < J->last; it++) {
        const int64_t e = it / panels, j = it % panels;
        const int64_t p0 = J->start[e], n = J->start[e + 1] - p0;
        if (n == 0) continue;
        const int64_t rg = e * 2 * I + j * QCH, ru = rg + I, rd = e * H + j * QCH;
        for (int64_t m = 0; m < n; m += QMR) {
            const int mr = (int)(n - m < QMR ? n - m : QMR);
            if (J->phase == 0) {
                for (int h = 0; h < QCH / QGROUP; h++) {
                    qgemm_tile(J->xs, p0 + m, mr, J->W13, rg / QGROUP + h, g + h * QGROUP, QCH);
                    qgemm_tile(J->xs, p0 + m, mr, J->W13, ru / QGROUP + h, u + h * QGROUP, QCH);
                }
                for (int i = 0; i < mr; i++) silu_mul16(g + i * QCH, u + i * QCH, J->act + (p0 + m + i) * I + j * QCH);
            } else {
                for (int h = 0; h < QCH / QGROUP; h++)
                    qgemm_tile(J->as, p0 + m, mr, J->W2, rd / QGROUP + h, y + h * QGROUP, QCH);
                for (int i = 0; i < mr; i++)
                    memcpy(J->ys + J->pair[p0 + m + i] * H + j * QCH, y + i * QCH, QCH * sizeof(float));
            }
        }
    }
}

static void *qmoe_thread(void *arg) {
    qmoe_items((const qmoe_job_t *)arg);
    return NULL;
}

/* a phase's items (expert, 16-row chunk) split over threads, balanced by rows (split_expert_items) */
static void qmoe_phase(qmoe_job_t *base, int phase, int nthreads) {
    const int64_t panels = phase == 0 ? base->I / QCH : base->H / QCH;
    qmoe_job_t jobs[MAX_THREADS];
    int64_t bounds[MAX_THREADS + 1];
    split_expert_items(base->start, base->E, panels, nthreads, bounds);
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = *base;
        jobs[t].phase = phase;
        jobs[t].first = bounds[t];
        jobs[t].last = bounds[t + 1];
    }
    run_jobs(qmoe_thread, jobs, sizeof jobs[0], nthreads);
}

/* Returns 0 on success, 1 when out of memory, 2 for an expert id out of range, 3 for bad shapes.
 * x [T, H]; topk_ids [T, k] int64; topk_w [T, k]; out [T, H] (overwritten). */
int qmoe_f32(const float *x, const int64_t *topk_ids, const float *topk_w, int fmt, const uint8_t *q13,
             const uint16_t *d13, const uint16_t *m13, const uint8_t *q2, const uint16_t *d2, const uint16_t *m2,
             float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads) {
    if (H % QK || I % QK || T < 0 || k < 1 || E < 1 || fmt < QF_Q8 || fmt > QF_Q4Z ||
        (fmt == QF_Q4Z && (!m13 || !m2)))
        return 3;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t P = T * k;
    int64_t *start = (int64_t *)calloc((size_t)(E + 2), sizeof(int64_t));
    int64_t *pair = (int64_t *)malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    float *buf = (float *)malloc((size_t)(P > 0 ? P : 1) * (size_t)(I + H) * sizeof(float));
    qact_t xs = {0}, as = {0};
    int rc = 0;
    if (!start || !pair || !buf || !qact_alloc(&xs, P, H) || !qact_alloc(&as, P, I)) {
        rc = 1;
        goto done;
    }
    float *act = buf, *ys = buf + P * I;
    for (int64_t p = 0; p < P; p++) {
        const int64_t e = topk_ids[p];
        if (e < 0 || e >= E) { rc = 2; goto done; }
        if (topk_w[p] != 0.f) start[e + 2]++; /* a pair of weight 0 adds nothing: not computed */
    }
    for (int64_t e = 0; e < E; e++) start[e + 2] += start[e + 1];
    for (int64_t p = 0; p < P; p++)
        if (topk_w[p] != 0.f) pair[start[topk_ids[p] + 1]++] = p;
    /* now start[e] = first pair of expert e, start[E] = the pairs computed; quantize each pair's
     * row of x (a token's row quantizes the same in every slot: the same blocks, the same bits) */
    for (int64_t q = 0; q < start[E]; q++) quantize_rows(x + (pair[q] / k) * H, H, 1, H, &xs, q);
    const qmat_t W13 = {fmt, E * 2 * I, H, q13, d13, m13}, W2 = {fmt, E * H, I, q2, d2, m2};
    qmoe_job_t base = {k, E, H, I, &W13, &W2, start, pair, &xs, act, &as, ys, 0, 0, 0};
    qmoe_phase(&base, 0, nthreads);
    quantize_rows(act, I, start[E], I, &as, 0);
    qmoe_phase(&base, 1, nthreads);
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
    if (xs.q) qact_free(&xs);
    if (as.q) qact_free(&as);
    free(start); free(pair); free(buf);
    return rc;
}

#else
int qmoe_f32(const float *x, const int64_t *topk_ids, const float *topk_w, int fmt, const uint8_t *q13,
             const uint16_t *d13, const uint16_t *m13, const uint8_t *q2, const uint16_t *d2, const uint16_t *m2,
             float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, int nthreads) { return 4; }
#endif
