/* Paged decode attention on the CPU, reading the KV blocks in place (no gather).
 *
 * Built on first use by models/kernels/cpu_build.py (cc -O3 -march=native) and called as the
 * operator torch.ops.moe_serve.paged_decode_cpu (csrc/ops.cpp; the GIL is released for the call).
 * Threads: `run_jobs` (panel_gemm.h): PyTorch's OpenMP pool where the build binds to it, else
 * pthreads. (A pthread started per call used to wait for a core behind the OpenMP pool's threads,
 * still spinning after the previous op: ~1 ms per call on 2 cores instead of ~0.1.)
 *
 * Layouts (float32, C-contiguous):
 *   q       [B, H, D]          one query token per sequence
 *   k, v    [NB, BS, KVH, D]   the paged cache of one layer
 *   tables  [B, W] int64       block ids of each sequence
 *   lens    [B]    int64       keys each sequence attends to (0: its output is zeros)
 *   sinks   [H] or NULL        per-head sink logits (gpt-oss): one more term in each softmax's
 *                              denominator, whose probability mass is dropped
 *   out     [B, H, D]
 * The query of sequence b sits at position p = lens[b] - 1 and sees keys lo .. p, where lo is
 * max(0, p - window + 1) with a sliding window (window > 0) and at least p's chunk start
 * (p / chunk) * chunk with chunked attention (chunk > 0). Keys before lo are never read, so a
 * windowed step costs O(window), not O(context).
 * paged_decode_bf16 reads a bfloat16 cache (its 16-bit words, same layout) and paged_decode_fp8 a
 * float8_e4m3fn cache (bytes) with per-tensor scales: one routine (run_item_kind) for the three,
 * converting each token's row to float32 in the kernel (the float32 cache is read in place).
 * Work item = a sequence (all its heads: each token's K/V row is read as one contiguous run)
 * or, when there are fewer sequences than threads, one (sequence, KV head) pair.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "panel_gemm.h"

/* what the cache stores: float32 read in place; bfloat16 and float8_e4m3fn converted to float32
 * one token row at a time, with integer ops that vectorise (bf16: the 16 bits shifted into a
 * float32's upper half; fp8 S.EEEE.MMM, bias 7: sign, exponent and mantissa moved to float32's
 * places, times 2^120: exact, subnormals included while the FPU keeps subnormals (no DAZ, as
 * PyTorch leaves it); no NaN: the cache never holds one, writes saturate at +-448) */
enum { KV_F32 = 0, KV_BF16 = 1, KV_FP8 = 2 };

typedef struct {
    const float *q;
    const void *k, *v; /* the cache's elements: float, uint16_t (bf16) or uint8_t (fp8) by kind */
    const int64_t *tables, *lens;
    const float *sinks;
    float *out;
    int64_t B, H, KVH, D, BS, W, window, chunk;
    float scale;         /* the score scale (fp8: times k_scale) */
    int64_t hpi;         /* KV heads per work item: KVH (whole rows read contiguously) or 1 */
    int64_t first, last; /* work items [first, last) */
    int kind;            /* KV_F32, KV_BF16, KV_FP8 */
    float v_scale;       /* scales the output (fp8's v_scale; 1 otherwise), folded into the probabilities */
    int failed;          /* set by the job: its scratch could not be allocated */
} job_t;

/* The first key position the query of a sequence with L keys sees. */
static inline int64_t first_visible(int64_t L, int64_t window, int64_t chunk) {
    const int64_t p = L - 1;
    int64_t lo = 0;
    if (window > 0 && p - window + 1 > lo) lo = p - window + 1;
    if (chunk > 0 && (p / chunk) * chunk > lo) lo = (p / chunk) * chunk;
    return lo;
}

/* Keys the query of a sequence with L keys sees (0 for L <= 0). */
static inline int64_t visible_keys(int64_t L, int64_t window, int64_t chunk) {
    return L > 0 ? L - first_visible(L, window, chunk) : 0;
}

/* The n values of the cache from element `at` as float32: in place for a float32 cache, else
 * converted into `row` */
static inline const float *load_row(const job_t *j, const void *base, int64_t at, int64_t n, float *row) {
    switch (j->kind) {
    case KV_BF16: {
        const uint16_t *src = (const uint16_t *)base + at;
        uint32_t *dst = (uint32_t *)row;
        for (int64_t e = 0; e < n; e++) dst[e] = (uint32_t)src[e] << 16;
        return row;
    }
    case KV_FP8: {
        const uint8_t *src = (const uint8_t *)base + at;
        uint32_t *dst = (uint32_t *)row;
        for (int64_t e = 0; e < n; e++) dst[e] = ((uint32_t)(src[e] & 0x80) << 24) | ((uint32_t)(src[e] & 0x7f) << 20);
        for (int64_t e = 0; e < n; e++) row[e] *= 0x1p120f;
        return row;
    }
    default:
        return (const float *)base + at;
    }
}

/* Tokens ahead whose K (V) row a pass prefetches: a decode step finds its KV rows out of cache
 * (the layers between stream their weights through it), and a token's row of one KV head is a
 * short run (512 bytes for D = 128 in float32) every KVH * D elements, a pattern the hardware
 * prefetchers pick up slowly: the 2.4B model's step spent ~100 us per layer here, not ~20. */
#define KV_AHEAD 8

static inline void prefetch_kv_row(const job_t *j, const void *base, int64_t b, int64_t t, int64_t L, int64_t h0,
                                   int64_t n) {
    if (t >= L) return;
    const int64_t esize = j->kind == KV_F32 ? 4 : j->kind == KV_BF16 ? 2 : 1;
    const int64_t at = ((j->tables[b * j->W + t / j->BS] * j->BS + t % j->BS) * j->KVH + h0) * j->D;
    const char *p = (const char *)base + at * esize;
    for (int64_t o = 0; o < n * esize; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* One work item: sequence b, KV heads [h0, h0 + nh), each with its G query heads. A token's K
 * (then V) row of the item's heads is one contiguous run of nh * D values (`load_row`). */
static inline __attribute__((always_inline)) void run_item_kind(const job_t *j, int64_t b, int64_t h0, int64_t nh,
                                                                float *scores, float *row) {
    const int64_t G = j->H / j->KVH, D = j->D, BS = j->BS, KVH = j->KVH;
    const int64_t L = j->lens[b], R = nh * G, RD = nh * D; /* R query rows: heads h0 * G .. (h0 + nh) * G */
    const float *qb = j->q + (b * j->H + h0 * G) * D; /* [R, D] */
    float *ob = j->out + (b * j->H + h0 * G) * D;     /* [R, D] */
    memset(ob, 0, (size_t)(R * D) * sizeof(float));
    if (L <= 0) return;
    const int64_t *table = j->tables + b * j->W;
    const int64_t lo = first_visible(L, j->window, j->chunk), N = L - lo; /* N visible keys: lo .. L-1 */
    /* pass 1: scores [R, N] = q . k * scale; a token's KV heads are adjacent in memory */
    for (int64_t t = lo; t < lo + KV_AHEAD && t < L; t++) prefetch_kv_row(j, j->k, b, t, L, h0, RD);
    for (int64_t t = lo; t < L;) {
        const int64_t off = t % BS, n = (L - t < BS - off) ? (L - t) : (BS - off);
        const int64_t at = ((table[t / BS] * BS + off) * KVH + h0) * D;
        for (int64_t i = 0; i < n; i++) {
            prefetch_kv_row(j, j->k, b, t + i + KV_AHEAD, L, h0, RD);
            const float *kr = load_row(j, j->k, at + i * KVH * D, RD, row);
            for (int64_t r = 0; r < R; r++) {
                const float *kt = kr + (r / G) * D, *qr = qb + r * D;
                float acc = 0.f;
#pragma GCC ivdep
                for (int64_t d = 0; d < D; d++) acc += qr[d] * kt[d];
                scores[r * N + t - lo + i] = acc * j->scale;
            }
        }
        t += n;
    }
    /* softmax over each query row (with a sink: one more logit in the denominator) */
    for (int64_t r = 0; r < R; r++) {
        float *s = scores + r * N, m = -INFINITY, sum = 0.f;
        const float sink = j->sinks ? j->sinks[h0 * G + r] : -INFINITY;
        for (int64_t t = 0; t < N; t++) m = s[t] > m ? s[t] : m;
        if (sink > m) m = sink;
        for (int64_t t = 0; t < N; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        if (j->sinks) sum += expf(sink - m);
        const float inv = j->v_scale / sum; /* the values' scale (1 but for fp8), folded into the probabilities */
        for (int64_t t = 0; t < N; t++) s[t] *= inv;
    }
    /* pass 2: out [R, D] = sum_t p[r, t] * v_t */
    for (int64_t t = lo; t < lo + KV_AHEAD && t < L; t++) prefetch_kv_row(j, j->v, b, t, L, h0, RD);
    for (int64_t t = lo; t < L;) {
        const int64_t off = t % BS, n = (L - t < BS - off) ? (L - t) : (BS - off);
        const int64_t at = ((table[t / BS] * BS + off) * KVH + h0) * D;
        for (int64_t i = 0; i < n; i++) {
            prefetch_kv_row(j, j->v, b, t + i + KV_AHEAD, L, h0, RD);
            const float *vr = load_row(j, j->v, at + i * KVH * D, RD, row);
            for (int64_t r = 0; r < R; r++) {
                const float *vt = vr + (r / G) * D;
                const float p = scores[r * N + t - lo + i];
                float *orow = ob + r * D;
#pragma GCC ivdep
                for (int64_t d = 0; d < D; d++) orow[d] += p * vt[d];
            }
        }
        t += n;
    }
}

/* one copy of the routine per cache kind (the kind a constant inside each: no branch per row) */
static void run_item_f32(const job_t *j, int64_t b, int64_t h0, int64_t nh, float *scores, float *row) {
    job_t c = *j;
    c.kind = KV_F32;
    run_item_kind(&c, b, h0, nh, scores, row);
}
static void run_item_bf16(const job_t *j, int64_t b, int64_t h0, int64_t nh, float *scores, float *row) {
    job_t c = *j;
    c.kind = KV_BF16;
    run_item_kind(&c, b, h0, nh, scores, row);
}
static void run_item_fp8(const job_t *j, int64_t b, int64_t h0, int64_t nh, float *scores, float *row) {
    job_t c = *j;
    c.kind = KV_FP8;
    run_item_kind(&c, b, h0, nh, scores, row);
}

static void *run_range(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t per_seq = j->KVH / j->hpi;
    int64_t maxlen = 1;
    for (int64_t it = j->first; it < j->last; it++) {
        const int64_t L = visible_keys(j->lens[it / per_seq], j->window, j->chunk);
        maxlen = L > maxlen ? L : maxlen;
    }
    /* bf16 / fp8: one converted row of the item's heads after the scores */
    const size_t nscores = (size_t)(j->hpi * (j->H / j->KVH) * maxlen);
    const size_t nrow = j->kind != KV_F32 ? (size_t)(j->hpi * j->D) : 0;
    float *scores = (float *)malloc((nscores + nrow) * sizeof(float));
    if (scores == NULL) {
        j->failed = 1;
        return NULL;
    }
    void (*item)(const job_t *, int64_t, int64_t, int64_t, float *, float *) =
        j->kind == KV_BF16 ? run_item_bf16 : j->kind == KV_FP8 ? run_item_fp8 : run_item_f32;
    for (int64_t it = j->first; it < j->last; it++)
        item(j, it / per_seq, (it % per_seq) * j->hpi, j->hpi, scores, scores + nscores);
    free(scores);
    return NULL;
}

static int paged_decode_run(const float *q, const void *k, const void *v, int kind, float v_scale,
                            const int64_t *tables, const int64_t *lens, const float *sinks, float *out, int64_t B,
                            int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk,
                            float scale, int nthreads);

int paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                     const int64_t *lens, float *out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                     int64_t BS, int64_t W, float scale, int nthreads) {
    return paged_decode_variant_f32(q, k, v, tables, lens, NULL, out, B, H, KVH, D, BS, W, 0, 0, scale, nthreads);
}

/* Returns 0 on success. Items are split into `nthreads` contiguous ranges of equal key counts
 * (visible keys: a window's or chunk's, not the whole context's). window, chunk: 0 for none;
 * sinks: NULL for none. */
int paged_decode_variant_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                             const int64_t *lens, const float *sinks, float *out, int64_t B, int64_t H,
                             int64_t KVH, int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk,
                             float scale, int nthreads) {
    return paged_decode_run(q, k, v, KV_F32, 1.f, tables, lens, sinks, out, B, H, KVH, D, BS, W, window, chunk,
                            scale, nthreads);
}

/* The same over a bfloat16 cache (k16, v16: its bits, same layout), widened to float32 in the
 * kernel (exactly: the 16 bits are a float32's upper half). */
int paged_decode_bf16(const float *q, const uint16_t *k16, const uint16_t *v16, const int64_t *tables,
                      const int64_t *lens, const float *sinks, float *out, int64_t B, int64_t H, int64_t KVH,
                      int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk, float scale, int nthreads) {
    return paged_decode_run(q, k16, v16, KV_BF16, 1.f, tables, lens, sinks, out, B, H, KVH, D, BS, W, window,
                            chunk, scale, nthreads);
}

/* The same over a float8_e4m3fn cache (k8, v8: its bytes, same layout): keys k8 * k_scale,
 * values v8 * v_scale, converted to float32 in the kernel. */
int paged_decode_fp8(const float *q, const uint8_t *k8, const uint8_t *v8, float k_scale, float v_scale,
                     const int64_t *tables, const int64_t *lens, const float *sinks, float *out, int64_t B,
                     int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk,
                     float scale, int nthreads) {
    return paged_decode_run(q, k8, v8, KV_FP8, v_scale, tables, lens, sinks, out, B, H, KVH, D, BS, W, window,
                            chunk, scale * k_scale, nthreads);
}

static int paged_decode_run(const float *q, const void *k, const void *v, int kind, float v_scale,
                            const int64_t *tables, const int64_t *lens, const float *sinks, float *out, int64_t B,
                            int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t W, int64_t window, int64_t chunk,
                            float scale, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    /* whole sequences per item when there are enough of them, else one item per KV head */
    const int64_t hpi = B >= 2 * nthreads ? KVH : 1, items = B * (KVH / hpi);
    if (nthreads > items) nthreads = (int)(items > 0 ? items : 1);
    job_t jobs[MAX_THREADS];
    int64_t total = 0;
    for (int64_t b = 0; b < B; b++) total += visible_keys(lens[b], window, chunk);
    total *= KVH / hpi;
    /* balance by work (keys), not by item count */
    int64_t it = 0, acc = 0;
    for (int t = 0; t < nthreads; t++) {
        job_t *j = &jobs[t];
        *j = (job_t){q, k, v, tables, lens, sinks, out, B, H, KVH, D, BS, W, window, chunk, scale, hpi, it, it,
                     kind, v_scale, 0};
        const int64_t target = total * (t + 1) / nthreads;
        while (it < items && (t == nthreads - 1 || acc < target)) {
            acc += visible_keys(lens[it / (KVH / hpi)], window, chunk);
            it++;
        }
        j->last = it;
    }
    run_jobs(run_range, jobs, sizeof jobs[0], nthreads);
    for (int t = 0; t < nthreads; t++)
        if (jobs[t].failed) return 1;
    return 0;
}
