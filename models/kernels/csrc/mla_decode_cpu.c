/* MLA decode attention on the CPU (float32), absorbed form, reading the paged latent cache in
 * place (no gather).
 *
 * Multi-head latent attention (models/layers/mla.py) caches per token the latent c (R values)
 * and the rotary key k_pe (DR values, one for all heads, followed in its row by DSA's index key
 * where the model has one: row width PW >= DR). With the query heads moved into latent space
 * (q_lat = W_uk^T q_nope, done by the caller), every head attends to the same single "KV head":
 *   s[h, t]   = (q_lat[h] . c_t + q_pe[h] . k_pe_t) * scale
 *   out[h]    = sum_t softmax(s[h])_t c_t          (latent space; the caller applies W_uv)
 *
 * Layouts (float32, C-contiguous):
 *   q_lat   [B, H, R]          q_pe [B, H, DR]
 *   lat     [NB, BS, 1, R]     pe   [NB, BS, 1, PW]      one layer's paged cache pair
 *   tables  [B, W] int64       block ids of each row's sequence
 *   lens    [B]    int64       tokens each row attends to (0: its output is zeros)
 *   out     [B, H, R]
 * A row is one query token: a decode sequence, or one token of a prefill chunk (its causal
 * length, its sequence's table). Work item = a row with all its heads (each cached token is
 * read once for all of them) or, with fewer rows than threads, a row's range of heads.
 * Threads: `run_jobs` (panel_gemm.h), PyTorch's OpenMP pool or pthreads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "panel_gemm.h"

/* below this many multiply-adds in a call one thread is faster than waking others */
#define MLA_MIN_MACS_PER_THREAD (1 << 18)

typedef struct {
    const float *q_lat, *q_pe, *lat, *pe;
    const int64_t *tables, *lens;
    float *out;
    int64_t H, R, DR, PW, BS, W;
    float scale;
    int64_t hpi, per_row; /* heads per work item, items per row */
    int64_t first, last;  /* work items [first, last) */
    int failed;
} mla_job_t;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[h] += q[h * ldq :][:n] . c[:n] for h < nh: four heads at a time (four independent FMA
 * chains, each load of c serving all four), the rest one by one */
static inline void dots(const float *q, int64_t ldq, int64_t nh, const float *c, int64_t n, float *out) {
    const int64_t n8 = n & ~(int64_t)7;
    int64_t h = 0;
    for (; h + 4 <= nh; h += 4) {
        const float *q0 = q + h * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < n8; d += 8) {
            const __m256 cv = _mm256_loadu_ps(c + d);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), cv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), cv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), cv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), cv, a3);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (int64_t d = n8; d < n; d++) {
            s0 += q0[d] * c[d]; s1 += q1[d] * c[d]; s2 += q2[d] * c[d]; s3 += q3[d] * c[d];
        }
        out[h] += s0; out[h + 1] += s1; out[h + 2] += s2; out[h + 3] += s3;
    }
    for (; h < nh; h++) {
        const float *qh = q + h * ldq;
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < n8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(c + d), a);
        float sum = hsum(a);
        for (int64_t d = n8; d < n; d++) sum += qh[d] * c[d];
        out[h] += sum;
    }
}

/* Row b, heads [h0, h0 + nh); `scores` holds nh * lens[b] floats. */
static void mla_item(const mla_job_t *j, int64_t b, int64_t h0, int64_t nh, float *scores) {
    const int64_t R = j->R, DR = j->DR, PW = j->PW, BS = j->BS, L = j->lens[b];
    const float *ql = j->q_lat + (b * j->H + h0) * R, *qp = j->q_pe + (b * j->H + h0) * DR;
    float *ob = j->out + (b * j->H + h0) * R;
    memset(ob, 0, (size_t)(nh * R) * sizeof(float));
    if (L <= 0) return;
    const int64_t *table = j->tables + b * j->W;
    /* pass 1: scores [L, nh] (token-major); a token's latent and rotary key are read once for
     * all heads */
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const int64_t n = (L - t0 < BS) ? (L - t0) : BS, blk = table[t0 / BS];
        const float *cb = j->lat + blk * BS * R, *pb = j->pe + blk * BS * PW;
        for (int64_t i = 0; i < n; i++) {
            float *st = scores + (t0 + i) * nh;
            for (int64_t h = 0; h < nh; h++) st[h] = 0.f;
            dots(ql, R, nh, cb + i * R, R, st);
            dots(qp, DR, nh, pb + i * PW, DR, st);
            for (int64_t h = 0; h < nh; h++) st[h] *= j->scale;
        }
    }
    /* softmax over each head's column */
    for (int64_t h = 0; h < nh; h++) {
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < L; t++) m = scores[t * nh + h] > m ? scores[t * nh + h] : m;
        for (int64_t t = 0; t < L; t++) {
            const float e = expf(scores[t * nh + h] - m);
            scores[t * nh + h] = e;
            sum += e;
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; t++) scores[t * nh + h] *= inv;
    }
    /* pass 2: out [nh, R] = sum_t p[h, t] c_t */
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const int64_t n = (L - t0 < BS) ? (L - t0) : BS;
        const float *cb = j->lat + table[t0 / BS] * BS * R;
        for (int64_t i = 0; i < n; i++) {
            const float *c = cb + i * R;
            for (int64_t h = 0; h < nh; h++) {
                const float w = scores[(t0 + i) * nh + h];
                float *o = ob + h * R;
#pragma GCC ivdep
                for (int64_t d = 0; d < R; d++) o[d] += w * c[d];
            }
        }
    }
}

static void *mla_range(void *arg) {
    mla_job_t *j = (mla_job_t *)arg;
    int64_t maxlen = 1;
    for (int64_t it = j->first; it < j->last; it++) {
        const int64_t L = j->lens[it / j->per_row];
        maxlen = L > maxlen ? L : maxlen;
    }
    float *scores = (float *)malloc((size_t)(j->hpi * maxlen) * sizeof(float));
    if (scores == NULL) { j->failed = 1; return NULL; }
    for (int64_t it = j->first; it < j->last; it++) {
        const int64_t b = it / j->per_row, h0 = (it % j->per_row) * j->hpi;
        mla_item(j, b, h0, (j->H - h0 < j->hpi) ? j->H - h0 : j->hpi, scores);
    }
    free(scores);
    return NULL;
}

int mla_decode_f32(const float *q_lat, const float *q_pe, const float *lat, const float *pe, const int64_t *tables,
                   const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR, int64_t PW,
                   int64_t BS, int64_t W, float scale, int nthreads) {
    if (B <= 0 || H <= 0) return 0;
    if (R <= 0 || DR < 0 || PW < DR || BS <= 0) return 3;
    int64_t keys = 0;
    for (int64_t b = 0; b < B; b++) keys += lens[b] > 0 ? lens[b] : 0;
    const int64_t macs = keys * H * (2 * R + DR);
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > macs / MLA_MIN_MACS_PER_THREAD) nthreads = (int)(macs / MLA_MIN_MACS_PER_THREAD);
    if (nthreads < 1) nthreads = 1;
    /* whole rows per item when there are enough of them, else each row's heads split in ranges */
    int64_t per_row = 1;
    if (B < 2 * nthreads) {
        per_row = (2 * nthreads + B - 1) / B;
        per_row = per_row > H ? H : per_row;
    }
    const int64_t hpi = (H + per_row - 1) / per_row;
    per_row = (H + hpi - 1) / hpi;
    const int64_t items = B * per_row;
    if (nthreads > items) nthreads = (int)items;
    mla_job_t jobs[MAX_THREADS];
    /* balance by work (keys), not by item count */
    const int64_t total = keys * per_row;
    int64_t it = 0, acc = 0;
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (mla_job_t){q_lat, q_pe, lat, pe, tables, lens, out, H, R, DR, PW, BS, W, scale, hpi, per_row,
                              it, it, 0};
        const int64_t target = total * (t + 1) / nthreads;
        while (it < items && (t == nthreads - 1 || acc < target)) {
            const int64_t L = lens[it / per_row];
            acc += L > 0 ? L : 0;
            it++;
        }
        jobs[t].last = it;
    }
    run_jobs(mla_range, jobs, sizeof jobs[0], nthreads);
    for (int t = 0; t < nthreads; t++)
        if (jobs[t].failed) return 1;
    return 0;
}

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int mla_decode_f32(const float *q_lat, const float *q_pe, const float *lat, const float *pe, const int64_t *tables,
                   const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR, int64_t PW,
                   int64_t BS, int64_t W, float scale, int nthreads) { return 4; }
#endif
