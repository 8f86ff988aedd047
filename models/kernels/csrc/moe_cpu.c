/* Fused MoE experts on the CPU (float32, AVX2 + FMA), for decode-sized batches.
 *
 * out[t] = sum_s topk_w[t, s] * W2[e] @ (silu(G[e] @ x[t]) * (U[e] @ x[t])),  e = topk_ids[t, s]
 *
 * One call per layer: the pairs are grouped by expert here, each active expert's rows of x
 * are gathered, gate+up run with SiLU-and-mul fused into the same pass, then down; each
 * weight is read once per call, as one sequential stream (the packed layouts below), which
 * is what a decode step on the CPU is bound by. Built by models/kernels/cpu_build.py and called as
 * the operator torch.ops.moe_serve.moe_experts_cpu (csrc/ops.cpp; the GIL is released). Threads:
 * `run_jobs` (panel_gemm.h), PyTorch's own OpenMP pool where cpu_build compiles with -fopenmp,
 * pthreads otherwise.
 *
 * Packed layouts (moe_pack_f32 builds them from the model's [E, 2I, H] and [E, H, I]):
 *   w13p [E, I/16, 2, H, 16]  panel j: the gate rows 16j..16j+15, then the up rows, each
 *                             stored k-major ([H][16]), so a panel is one contiguous run
 *   w2p  [E, H/16, I, 16]
 * Each output element sums over k in order, whatever the batch: results do not depend on
 * which other tokens share the step (batch invariance).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

int moe_cpu_available(void) { return 1; }

/* 1 when built with -fopenmp: the kernels' threads are PyTorch's OpenMP pool */
int cpu_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#include "panel_gemm.h"

typedef struct {
    /* shapes */
    int64_t T, k, E, H, I;
    const float *x, *topk_w, *w13p, *w2p;
    float *out;
    /* the family variants (moe_fused_variant_f32): biases [E, 2I] / [E, H] or NULL, the clamped SwiGLU */
    const float *b13, *b2;
    int clamp;
    float alpha, limit;
    /* grouping (built once per call) */
    const int64_t *start; /* [E + 1] first pair (in expert order) of each expert */
    const int64_t *pair;  /* [P] pair index t * k + s, in expert order */
    float *xs;            /* [P, H] gathered rows of x, in expert order */
    float *act;           /* [P, I] silu(gate) * up */
    float *ys;            /* [P, H] down output, by pair index t * k + s */
    /* work split: items [first, last) of the current phase */
    int phase;
    int64_t first, last;
} moe_job_t;

/* a[0:16] += b[0:16] */
static inline void add16(float *a, const float *b) {
    for (int h = 0; h < NR; h += 8) _mm256_storeu_ps(a + h, _mm256_add_ps(_mm256_loadu_ps(a + h), _mm256_loadu_ps(b + h)));
}

/* gpt-oss: a[0:16] = (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'),  g' = min(g, limit) */
static inline void clamped_swiglu16(const float *g, const float *u, float *a, float alpha, float limit) {
    const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.f);
    const __m256 nalpha = _mm256_set1_ps(-alpha);
    for (int h = 0; h < NR; h += 8) {
        const __m256 gv = _mm256_min_ps(_mm256_loadu_ps(g + h), lim);
        const __m256 uv = _mm256_add_ps(_mm256_max_ps(_mm256_min_ps(_mm256_loadu_ps(u + h), lim), nlim), one);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_mul_ps(nalpha, gv)));
        _mm256_storeu_ps(a + h, _mm256_mul_ps(_mm256_div_ps(gv, den), uv));
    }
}

/* phase 0 items: (expert, gate/up panel j), j < I/16; phase 1: (expert, down panel j), j < H/16 */
static void run_items(const moe_job_t *J) {
    const int64_t H = J->H, I = J->I;
    const int64_t panels = J->phase == 0 ? I / NR : H / NR;
    float g[MR * NR], u[MR * NR], y[MR * NR];
    for (int64_t it = J->first; it < J->last; it++) {
        const int64_t e = it / panels, j = it % panels;
        const int64_t p0 = J->start[e], n = J->start[e + 1] - p0;
        if (n == 0) continue;
        if (J->phase == 0) {
            const float *gp = J->w13p + ((e * (I / NR) + j) * 2) * H * NR, *up = gp + H * NR;
            for (int64_t m = 0; m < n;) {
                /* up to 2 rows: gate and up panels streamed side by side (two memory streams);
                 * more rows: 6 at a time, one panel after the other (compute bound) */
                const int mr = (int)(n - m <= MR2 ? n - m : (n - m < MR ? n - m : MR));
                const float *xm = J->xs + (p0 + m) * H;
                if (mr <= MR2) {
                    micro2_any(mr, xm, H, gp, up, H, g, u, NR);
                } else {
                    micro_any(mr, xm, H, gp, H, g, NR);
                    micro_any(mr, xm, H, up, H, u, NR);
                }
                for (int i = 0; i < mr; i++) {
                    if (J->b13) add16(g + i * NR, J->b13 + e * 2 * I + j * NR), add16(u + i * NR, J->b13 + e * 2 * I + I + j * NR);
                    if (J->clamp) clamped_swiglu16(g + i * NR, u + i * NR, J->act + (p0 + m + i) * I + j * NR, J->alpha, J->limit);
                    else silu_mul16(g + i * NR, u + i * NR, J->act + (p0 + m + i) * I + j * NR);
                }
                m += mr;
            }
        } else {
            const float *dp = J->w2p + (e * (H / NR) + j) * I * NR;
            for (int64_t m = 0; m < n; m += MR) {
                const int mr = (int)(n - m < MR ? n - m : MR);
                micro_any(mr, J->act + (p0 + m) * I, I, dp, I, y, NR);
                for (int i = 0; i < mr; i++) {
                    if (J->b2) add16(y + i * NR, J->b2 + e * H + j * NR);
                    memcpy(J->ys + J->pair[p0 + m + i] * H + j * NR, y + i * NR, NR * sizeof(float));
                }
            }
        }
    }
}

static void *run_thread(void *arg) {
    run_items((const moe_job_t *)arg);
    return NULL;
}

/* Split a phase's items over threads, balanced by rows (split_expert_items, panel_gemm.h). */
static void run_phase(moe_job_t *base, int phase, int nthreads) {
    const int64_t panels = phase == 0 ? base->I / NR : base->H / NR;
    moe_job_t jobs[MAX_THREADS];
    int64_t bounds[MAX_THREADS + 1];
    split_expert_items(base->start, base->E, panels, nthreads, bounds);
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = *base;
        jobs[t].phase = phase;
        jobs[t].first = bounds[t];
        jobs[t].last = bounds[t + 1];
    }
    run_jobs(run_thread, jobs, sizeof jobs[0], nthreads);
}

/* Returns 0 on success, 1 when out of memory, 2 for an expert id out of range, 3 for bad shapes.
 * x [T, H], topk_ids [T, k] int64, topk_w [T, k] float32, out [T, H] (overwritten). */
int moe_fused_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const float *w13p,
                  const float *w2p, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                  int nthreads) {
    return moe_fused_variant_f32(x, topk_ids, topk_w, w13p, w2p, NULL, NULL, 0, 0.f, 0.f, 0, out, T, k, E, H, I,
                                 nthreads);
}

/* moe_fused_f32 with the family variants (fused_moe.ExpertVariant):
 *   b13 [E, 2I] (gate biases, then up biases) added to gate and up, b2 [E, H] to the down output
 *   (NULL: none; gpt-oss);
 *   clamp != 0: the clamped SwiGLU (gpt-oss, clamped_swiglu16) with `alpha` and `limit`;
 *   weight_on_input != 0: each pair's row of x is scaled by its routing weight before the expert,
 *   and the outputs summed unweighted (Llama 4). */
int moe_fused_variant_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const float *w13p,
                          const float *w2p, const float *b13, const float *b2, int clamp, float alpha, float limit,
                          int weight_on_input, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                          int nthreads) {
    if (H % NR || I % NR || T < 0 || k < 1 || E < 1) return 3;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t P = T * k;
    int64_t *start = (int64_t *)calloc((size_t)(E + 2), sizeof(int64_t));
    int64_t *pair = (int64_t *)malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    float *xs = (float *)malloc((size_t)(P > 0 ? P : 1) * (size_t)(2 * H + I) * sizeof(float));
    if (!start || !pair || !xs) { free(start); free(pair); free(xs); return 1; }
    float *act = xs + P * H, *ys = act + P * I;
    int rc = 0;
    for (int64_t p = 0; p < P; p++) {
        const int64_t e = topk_ids[p];
        if (e < 0 || e >= E) { rc = 2; goto done; }
        start[e + 2]++;
    }
    for (int64_t e = 0; e < E; e++) start[e + 2] += start[e + 1]; /* start[e + 1] = first pair of e */
    for (int64_t p = 0; p < P; p++) pair[start[topk_ids[p] + 1]++] = p;  /* stable: pairs of e in (t, s) order */
    /* now start[e] = first pair of expert e, start[E] = P */
    for (int64_t q = 0; q < P; q++) {
        const float *src = x + (pair[q] / k) * H;
        float *dst = xs + q * H;
        if (weight_on_input) {
            const float w = topk_w[pair[q]];
            for (int64_t h = 0; h < H; h++) dst[h] = src[h] * w;
        } else {
            memcpy(dst, src, (size_t)H * sizeof(float));
        }
    }
    moe_job_t base = {T, k, E, H, I, x, topk_w, w13p, w2p, out, b13, b2, clamp, alpha, limit,
                      start, pair, xs, act, ys, 0, 0, 0};
    run_phase(&base, 0, nthreads);
    run_phase(&base, 1, nthreads);
    /* out[t] = sum_s w[t, s] * ys[t * k + s], in slot order */
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        for (int64_t h = 0; h < H; h += 8) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t s = 0; s < k; s++)
                a = weight_on_input ? _mm256_add_ps(a, _mm256_loadu_ps(ys + (t * k + s) * H + h))
                                    : _mm256_fmadd_ps(_mm256_set1_ps(topk_w[t * k + s]), _mm256_loadu_ps(ys + (t * k + s) * H + h), a);
            _mm256_storeu_ps(o + h, a);
        }
    }
done:
    free(start); free(pair); free(xs);
    return rc;
}

/* Pack the experts' weights: w13 [E, 2I, H] -> w13p [E, I/16, 2, H, 16]; w2 [E, H, I] -> w2p [E, H/16, I, 16]. */
void moe_pack_f32(const float *w13, const float *w2, float *w13p, float *w2p, int64_t E, int64_t H, int64_t I) {
    for (int64_t e = 0; e < E; e++) {
        for (int64_t j = 0; j < I / NR; j++)
            for (int64_t half = 0; half < 2; half++) {
                float *dst = w13p + ((e * (I / NR) + j) * 2 + half) * H * NR;
                const float *src = w13 + (e * 2 * I + half * I + j * NR) * H; /* rows j*16.. of gate or up */
                for (int64_t c = 0; c < NR; c++)
                    for (int64_t kk = 0; kk < H; kk++) dst[kk * NR + c] = src[c * H + kk];
            }
        for (int64_t j = 0; j < H / NR; j++) {
            float *dst = w2p + (e * (H / NR) + j) * I * NR;
            const float *src = w2 + (e * H + j * NR) * I;
            for (int64_t c = 0; c < NR; c++)
                for (int64_t kk = 0; kk < I; kk++) dst[kk * NR + c] = src[c * I + kk];
        }
    }
}

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int moe_cpu_available(void) { return 0; }
int cpu_kernels_openmp(void) { return 0; }
int moe_fused_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const float *w13p,
                  const float *w2p, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                  int nthreads) { return 4; }
int moe_fused_variant_f32(const float *x, const int64_t *topk_ids, const float *topk_w, const float *w13p,
                          const float *w2p, const float *b13, const float *b2, int clamp, float alpha, float limit,
                          int weight_on_input, float *out, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                          int nthreads) { return 4; }
void moe_pack_f32(const float *w13, const float *w2, float *w13p, float *w2p, int64_t E, int64_t H, int64_t I) {}
#endif

/* The router's expert choice (models/layers/router.py select_experts) for T tokens, one pass per
 * token: logits [T, E] -> weights [T, k] float32, ids [T, k] int64, the ids in descending order
 * of their choice score (as torch.topk). scoring: 0 softmax over the experts, 1 sigmoid, 2 softmax
 * over the top-k logits; corr [E] (or NULL) is added to the scores for the choice only; with
 * n_group > 1 and topk_group < n_group only the experts of the best topk_group groups are
 * eligible, a group scored by its best expert (group_top2 0) or its best two summed (1);
 * renormalize divides the weights by max(their sum, renorm_min); scaling multiplies them.
 * Scalar code: a decode step routes a handful of tokens over tens of experts. Returns 0, 1 when out
 * of memory, 3 for bad arguments. */
int moe_route_f32(const float *logits, const float *corr, float *weights, int64_t *ids, int64_t T, int64_t E,
                  int64_t k, int scoring, int renormalize, float renorm_min, int64_t n_group, int64_t topk_group,
                  int group_top2, float scaling) {
    if (k < 1 || k > E || n_group < 1 || E % n_group || topk_group < 1 || topk_group > n_group || scoring < 0 ||
        scoring > 2)
        return 3;
    float *scores = (float *)malloc((size_t)(2 * E + n_group) * sizeof(float));
    unsigned char *taken = (unsigned char *)malloc((size_t)(E > n_group ? E : n_group));
    if (!scores || !taken) { free(scores); free(taken); return 1; }
    float *choice = scores + E, *gscore = choice + E;
    const int64_t per_group = E / n_group;
    const int grouped = n_group > 1 && topk_group < n_group;
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        if (scoring == 0) {
            float m = l[0], sum = 0.f;
            for (int64_t e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
            for (int64_t e = 0; e < E; e++) sum += scores[e] = expf(l[e] - m);
            for (int64_t e = 0; e < E; e++) scores[e] /= sum;
        } else if (scoring == 1) {
            for (int64_t e = 0; e < E; e++) scores[e] = 1.f / (1.f + expf(-l[e]));
        } else {
            for (int64_t e = 0; e < E; e++) scores[e] = l[e];
        }
        for (int64_t e = 0; e < E; e++) choice[e] = scores[e] + (corr && scoring != 2 ? corr[e] : 0.f);
        if (grouped && scoring != 2) {
            for (int64_t g = 0; g < n_group; g++) {
                const float *c = choice + g * per_group;
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t j = 0; j < per_group; j++) {
                    if (c[j] > b1) { b2 = b1; b1 = c[j]; }
                    else if (c[j] > b2) b2 = c[j];
                }
                gscore[g] = group_top2 ? b1 + b2 : b1;
                taken[g] = 0;
            }
            for (int64_t r = 0; r < topk_group; r++) {
                int64_t best = -1;
                for (int64_t g = 0; g < n_group; g++)
                    if (!taken[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                taken[best] = 1;
            }
            for (int64_t g = 0; g < n_group; g++)
                if (!taken[g])
                    for (int64_t j = 0; j < per_group; j++) choice[g * per_group + j] = -INFINITY;
        }
        memset(taken, 0, (size_t)E);
        float *w = weights + t * k;
        int64_t *id = ids + t * k;
        float sum = 0.f;
        for (int64_t r = 0; r < k; r++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
            taken[best] = 1;
            id[r] = best;
            w[r] = scores[best];
            sum += w[r];
        }
        if (scoring == 2) { /* softmax over the chosen logits (w[0] is the largest) */
            float s = 0.f;
            for (int64_t r = 0; r < k; r++) s += w[r] = expf(w[r] - scores[id[0]]);
            for (int64_t r = 0; r < k; r++) w[r] /= s;
        } else if (renormalize) {
            const float d = sum > renorm_min ? sum : renorm_min;
            for (int64_t r = 0; r < k; r++) w[r] /= d;
        }
        if (scaling != 1.f)
            for (int64_t r = 0; r < k; r++) w[r] *= scaling;
    }
    free(scores); free(taken);
    return 0;
}
