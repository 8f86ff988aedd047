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
 *   lat     [NB, BS, 1, R]     pe   [NB, BS, 1, PW]      one layer's paged cache pair: float32, or
 *                              (mla_decode_q) bfloat16 / float8_e4m3fn with one scale for both,
 *                              converted to float32 in registers as they are loaded
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

/* what the latent cache stores: float32, bfloat16 or float8_e4m3fn (one scale for the latent and
 * the rotary key: `kscale`), converted to float32 in registers as it is loaded */
enum { MLA_F32 = 0, MLA_BF16 = 1, MLA_FP8 = 2 };

typedef struct {
    const float *q_lat, *q_pe;
    const void *lat, *pe; /* the cache's elements: float, uint16_t (bf16) or uint8_t (fp8) by kind */
    const int64_t *tables, *lens;
    float *out;
    int64_t H, R, DR, PW, BS, W;
    float scale;          /* the score scale (fp8: times kscale) */
    float vscale;         /* scales the output (fp8: kscale; 1 otherwise), folded into the probabilities */
    int kind;
    int64_t hpi, per_row; /* heads per work item, items per row */
    int64_t first, last;  /* work items [first, last) */
    int failed;
} mla_job_t;

#define MLA_INLINE static inline __attribute__((always_inline))

/* eight cache values from element i of `base` as float32: bf16 shifted into a float32's upper
 * half; fp8 (S.EEEE.MMM, bias 7) with its exponent and mantissa moved to float32's places and
 * multiplied by 2^120 (exact, subnormals included; the cache holds no NaN: writes saturate) */
MLA_INLINE __m256 ld8(const void *base, int64_t i, int kind) {
    if (kind == MLA_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i))), 16));
    if (kind == MLA_FP8) {
        const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)base + i)));
        const __m256i bits = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24),
                                             _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7f)), 20));
        return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
    }
    return _mm256_loadu_ps((const float *)base + i);
}

MLA_INLINE float ld1(const void *base, int64_t i, int kind) {
    if (kind == MLA_BF16) {
        const uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (kind == MLA_FP8) {
        const uint32_t x = ((const uint8_t *)base)[i], u = (x & 0x80u) << 24 | (x & 0x7fu) << 20;
        float f;
        memcpy(&f, &u, sizeof f);
        return f * 0x1p120f;
    }
    return ((const float *)base)[i];
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[h] += q[h * ldq :][:n] . c[:n] for h < nh (c: n cache values from element ci): four heads
 * at a time (four independent FMA chains, each load of c serving all four), the rest one by one */
MLA_INLINE void dots(const float *q, int64_t ldq, int64_t nh, const void *cb, int64_t ci, int64_t n, float *out,
                     int kind) {
    const int64_t n8 = n & ~(int64_t)7;
    int64_t h = 0;
    for (; h + 4 <= nh; h += 4) {
        const float *q0 = q + h * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < n8; d += 8) {
            const __m256 cv = ld8(cb, ci + d, kind);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), cv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), cv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), cv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), cv, a3);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (int64_t d = n8; d < n; d++) {
            const float c = ld1(cb, ci + d, kind);
            s0 += q0[d] * c; s1 += q1[d] * c; s2 += q2[d] * c; s3 += q3[d] * c;
        }
        out[h] += s0; out[h + 1] += s1; out[h + 2] += s2; out[h + 3] += s3;
    }
    for (; h < nh; h++) {
        const float *qh = q + h * ldq;
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < n8; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), ld8(cb, ci + d, kind), a);
        float sum = hsum(a);
        for (int64_t d = n8; d < n; d++) sum += qh[d] * ld1(cb, ci + d, kind);
        out[h] += sum;
    }
}

/* one step of the four heads' FMA chains for two tokens: x, y the tokens' values at d */
#define DOT_STEP(qa, qb, qc, qd, d, x, y)                                                       \
    do {                                                                                          \
        __m256 qv = _mm256_loadu_ps((qa) + (d));                                                  \
        a0 = _mm256_fmadd_ps(qv, x, a0); b0 = _mm256_fmadd_ps(qv, y, b0);                         \
        qv = _mm256_loadu_ps((qb) + (d));                                                         \
        a1 = _mm256_fmadd_ps(qv, x, a1); b1 = _mm256_fmadd_ps(qv, y, b1);                         \
        qv = _mm256_loadu_ps((qc) + (d));                                                         \
        a2 = _mm256_fmadd_ps(qv, x, a2); b2 = _mm256_fmadd_ps(qv, y, b2);                         \
        qv = _mm256_loadu_ps((qd) + (d));                                                         \
        a3 = _mm256_fmadd_ps(qv, x, a3); b3 = _mm256_fmadd_ps(qv, y, b3);                         \
    } while (0)

/* the sums of four vectors' lanes: [sum a, sum b, sum c, sum d] */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* Scores of four heads for two tokens: out0[k] += ql_k . c0 + qp_k . p0 and out1[k] += ql_k . c1 +
 * qp_k . p1 for k < 4 (ql_k = ql + k * R [R], qp_k = qp + k * DR [DR]; c0, c1 elements of the
 * latent cache `lat`, p0, p1 of the rotary cache `pe`): eight FMA chains, each load of a query
 * serving both tokens, the latent and rotary parts into the same chains, reduced once */
MLA_INLINE void dots4x2(const float *ql, int64_t R, const float *qp, int64_t DR, const void *lat, int64_t c0,
                        int64_t c1, const void *pe, int64_t p0, int64_t p1, float *out0, float *out1, int kind) {
    const int64_t r8 = R & ~(int64_t)7, dr8 = DR & ~(int64_t)7;
    const float *l0 = ql, *l1 = l0 + R, *l2 = l1 + R, *l3 = l2 + R;
    const float *e0 = qp, *e1 = e0 + DR, *e2 = e1 + DR, *e3 = e2 + DR;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t d = 0; d < r8; d += 8) {
        const __m256 x = ld8(lat, c0 + d, kind), y = ld8(lat, c1 + d, kind);
        DOT_STEP(l0, l1, l2, l3, d, x, y);
    }
    for (int64_t d = 0; d < dr8; d += 8) {
        const __m256 x = ld8(pe, p0 + d, kind), y = ld8(pe, p1 + d, kind);
        DOT_STEP(e0, e1, e2, e3, d, x, y);
    }
    __m128 s0 = hsum4(a0, a1, a2, a3), s1 = hsum4(b0, b1, b2, b3);
    if (r8 < R || dr8 < DR) {
        float t[8] = {0};
        const float *l[4] = {l0, l1, l2, l3}, *e[4] = {e0, e1, e2, e3};
        for (int k = 0; k < 4; k++) {
            for (int64_t d = r8; d < R; d++) {
                t[k] += l[k][d] * ld1(lat, c0 + d, kind);
                t[4 + k] += l[k][d] * ld1(lat, c1 + d, kind);
            }
            for (int64_t d = dr8; d < DR; d++) {
                t[k] += e[k][d] * ld1(pe, p0 + d, kind);
                t[4 + k] += e[k][d] * ld1(pe, p1 + d, kind);
            }
        }
        s0 = _mm_add_ps(s0, _mm_loadu_ps(t));
        s1 = _mm_add_ps(s1, _mm_loadu_ps(t + 4));
    }
    _mm_storeu_ps(out0, _mm_add_ps(_mm_loadu_ps(out0), s0));
    _mm_storeu_ps(out1, _mm_add_ps(_mm_loadu_ps(out1), s1));
}

/* o[k * R + d0 :][:w] = sum_t p[t * ldp + k] c_t[d0 :][:w] for k < nk (nk <= 4, w 16 or 8): the
 * accumulators stay in registers over all L tokens (each latent load serves nk heads) */
MLA_INLINE void wsum(const mla_job_t *j, const int64_t *table, int64_t L, const float *p, int64_t ldp, int64_t nk,
                     int64_t d0, int64_t w, float *o, int kind) {
    const int64_t R = j->R, BS = j->BS;
    __m256 a[4][2];
    for (int k = 0; k < 4; k++) a[k][0] = a[k][1] = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const int64_t n = (L - t0 < BS) ? (L - t0) : BS;
        int64_t ci = table[t0 / BS] * BS * R + d0;
        const float *pt = p + t0 * ldp;
        for (int64_t i = 0; i < n; i++, ci += R, pt += ldp) {
            const __m256 x = ld8(j->lat, ci, kind), y = w == 16 ? ld8(j->lat, ci + 8, kind) : x;
            for (int64_t k = 0; k < nk; k++) {
                const __m256 pk = _mm256_broadcast_ss(pt + k);
                a[k][0] = _mm256_fmadd_ps(pk, x, a[k][0]);
                if (w == 16) a[k][1] = _mm256_fmadd_ps(pk, y, a[k][1]);
            }
        }
    }
    for (int64_t k = 0; k < nk; k++) {
        _mm256_storeu_ps(o + k * R + d0, a[k][0]);
        if (w == 16) _mm256_storeu_ps(o + k * R + d0 + 8, a[k][1]);
    }
}

/* Row b, heads [h0, h0 + nh); `scores` holds nh * lens[b] floats. */
MLA_INLINE void mla_item_kind(const mla_job_t *j, int64_t b, int64_t h0, int64_t nh, float *scores, int kind) {
    const int64_t R = j->R, DR = j->DR, PW = j->PW, BS = j->BS, L = j->lens[b];
    const float *ql = j->q_lat + (b * j->H + h0) * R, *qp = j->q_pe + (b * j->H + h0) * DR;
    const void *lat = j->lat, *pe = j->pe;
    float *ob = j->out + (b * j->H + h0) * R;
    memset(ob, 0, (size_t)(nh * R) * sizeof(float));
    if (L <= 0) return;
    const int64_t *table = j->tables + b * j->W;
    /* pass 1: scores [L, nh] (token-major); a token's latent and rotary key are read once for
     * all heads */
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const int64_t n = (L - t0 < BS) ? (L - t0) : BS, blk = table[t0 / BS];
        const int64_t cb = blk * BS * R, pb = blk * BS * PW; /* element offsets of the block */
        float *st = scores + t0 * nh;
        for (int64_t h = 0; h < n * nh; h++) st[h] = 0.f;
        int64_t i = 0;
        for (; i + 2 <= n; i += 2) {  /* token pairs: four heads at a time, then the rest */
            int64_t h = 0;
            for (; h + 4 <= nh; h += 4)
                dots4x2(ql + h * R, R, qp + h * DR, DR, lat, cb + i * R, cb + (i + 1) * R, pe, pb + i * PW,
                        pb + (i + 1) * PW, st + i * nh + h, st + (i + 1) * nh + h, kind);
            for (int64_t k = i; k < i + 2; k++) {
                dots(ql + h * R, R, nh - h, lat, cb + k * R, R, st + k * nh + h, kind);
                dots(qp + h * DR, DR, nh - h, pe, pb + k * PW, DR, st + k * nh + h, kind);
            }
        }
        for (; i < n; i++) {
            dots(ql, R, nh, lat, cb + i * R, R, st + i * nh, kind);
            dots(qp, DR, nh, pe, pb + i * PW, DR, st + i * nh, kind);
        }
        for (int64_t h = 0; h < n * nh; h++) st[h] *= j->scale;
    }
    /* softmax over each head's column: eight heads at a time (a token's scores of eight heads are
     * one vector; exp8 of panel_gemm.h), the rest one by one; an fp8 cache's scale folded into
     * the probabilities (the values are the latents) */
    int64_t h8 = 0;
    for (; h8 + 8 <= nh; h8 += 8) {
        __m256 m = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (int64_t t = 0; t < L; t++) m = _mm256_max_ps(m, _mm256_loadu_ps(scores + t * nh + h8));
        for (int64_t t = 0; t < L; t++) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t * nh + h8), m));
            _mm256_storeu_ps(scores + t * nh + h8, e);
            sum = _mm256_add_ps(sum, e);
        }
        const __m256 inv = _mm256_div_ps(_mm256_set1_ps(j->vscale), sum);
        for (int64_t t = 0; t < L; t++)
            _mm256_storeu_ps(scores + t * nh + h8, _mm256_mul_ps(_mm256_loadu_ps(scores + t * nh + h8), inv));
    }
    for (int64_t h = h8; h < nh; h++) {
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < L; t++) m = scores[t * nh + h] > m ? scores[t * nh + h] : m;
        for (int64_t t = 0; t < L; t++) {
            const float e = expf(scores[t * nh + h] - m);
            scores[t * nh + h] = e;
            sum += e;
        }
        const float inv = j->vscale / sum;
        for (int64_t t = 0; t < L; t++) scores[t * nh + h] *= inv;
    }
    /* pass 2: out [nh, R] = sum_t p[h, t] c_t, in tiles of four heads by 16 (then 8) latent
     * values held in registers over all the tokens; the last R % 8 values one by one */
    const int64_t R16 = R & ~(int64_t)15, R8 = R & ~(int64_t)7;
    for (int64_t h = 0; h < nh; h += 4) {
        const int64_t nk = nh - h < 4 ? nh - h : 4;
        for (int64_t d = 0; d < R16; d += 16) wsum(j, table, L, scores + h, nh, nk, d, 16, ob + h * R, kind);
        if (R8 > R16) wsum(j, table, L, scores + h, nh, nk, R16, 8, ob + h * R, kind);
    }
    if (R8 < R) {
        for (int64_t t0 = 0; t0 < L; t0 += BS) {
            const int64_t n = (L - t0 < BS) ? (L - t0) : BS, cb = table[t0 / BS] * BS * R;
            for (int64_t i = 0; i < n; i++)
                for (int64_t h = 0; h < nh; h++)
                    for (int64_t d = R8; d < R; d++)
                        ob[h * R + d] += scores[(t0 + i) * nh + h] * ld1(lat, cb + i * R + d, kind);
        }
    }
}

/* one copy per cache kind (the kind a constant inside each: the loads specialised) */
static void mla_item_f32(const mla_job_t *j, int64_t b, int64_t h0, int64_t nh, float *s) {
    mla_item_kind(j, b, h0, nh, s, MLA_F32);
}
static void mla_item_bf16(const mla_job_t *j, int64_t b, int64_t h0, int64_t nh, float *s) {
    mla_item_kind(j, b, h0, nh, s, MLA_BF16);
}
static void mla_item_fp8(const mla_job_t *j, int64_t b, int64_t h0, int64_t nh, float *s) {
    mla_item_kind(j, b, h0, nh, s, MLA_FP8);
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
    void (*item)(const mla_job_t *, int64_t, int64_t, int64_t, float *) =
        j->kind == MLA_BF16 ? mla_item_bf16 : j->kind == MLA_FP8 ? mla_item_fp8 : mla_item_f32;
    for (int64_t it = j->first; it < j->last; it++) {
        const int64_t b = it / j->per_row, h0 = (it % j->per_row) * j->hpi;
        item(j, b, h0, (j->H - h0 < j->hpi) ? j->H - h0 : j->hpi, scores);
    }
    free(scores);
    return NULL;
}

static int mla_decode_run(const float *q_lat, const float *q_pe, const void *lat, const void *pe, int kind,
                          float kscale, const int64_t *tables, const int64_t *lens, float *out, int64_t B, int64_t H,
                          int64_t R, int64_t DR, int64_t PW, int64_t BS, int64_t W, float scale, int nthreads) {
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
        jobs[t] = (mla_job_t){q_lat, q_pe, lat, pe, tables, lens, out, H, R, DR, PW, BS, W, scale * kscale, kscale,
                              kind, hpi, per_row, it, it, 0};
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

int mla_decode_f32(const float *q_lat, const float *q_pe, const float *lat, const float *pe, const int64_t *tables,
                   const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR, int64_t PW,
                   int64_t BS, int64_t W, float scale, int nthreads) {
    return mla_decode_run(q_lat, q_pe, lat, pe, MLA_F32, 1.f, tables, lens, out, B, H, R, DR, PW, BS, W, scale,
                          nthreads);
}

/* The same over a bfloat16 (kind 1: uint16 words) or float8_e4m3fn (kind 2: bytes, values x8 *
 * kscale) latent cache, converted to float32 in registers. */
int mla_decode_q(const float *q_lat, const float *q_pe, const void *lat, const void *pe, int kind, float kscale,
                 const int64_t *tables, const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR,
                 int64_t PW, int64_t BS, int64_t W, float scale, int nthreads) {
    if (kind != MLA_BF16 && kind != MLA_FP8) return 3;
    return mla_decode_run(q_lat, q_pe, lat, pe, kind, kind == MLA_FP8 ? kscale : 1.f, tables, lens, out, B, H, R, DR,
                          PW, BS, W, scale, nthreads);
}

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int mla_decode_f32(const float *q_lat, const float *q_pe, const float *lat, const float *pe, const int64_t *tables,
                   const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR, int64_t PW,
                   int64_t BS, int64_t W, float scale, int nthreads) { return 4; }
int mla_decode_q(const float *q_lat, const float *q_pe, const void *lat, const void *pe, int kind, float kscale,
                 const int64_t *tables, const int64_t *lens, float *out, int64_t B, int64_t H, int64_t R, int64_t DR,
                 int64_t PW, int64_t BS, int64_t W, float scale, int nthreads) { return 4; }
#endif
