/* Linear layers over bf16 weights with float32 math on the CPU: a bf16 checkpoint's q/k/v, o,
 * shared experts and LM head kept in bf16 (half the bytes of float32), no float copy.
 *
 * y[M, N] = x[M, K] (float32) @ W[N, K]^T (+ bias), N a multiple of 16, any K. The weight is
 * held in bf16 panels of 16 output rows with pairs of k interleaved: [N/16, ceil(K/2), 16, 2]
 * (uint16; W[n, k] at [n / 16, k / 2, n % 16, k % 2]; an odd K's last pair padded with 0), so a
 * panel is one sequential stream, read once per call while up to 6 rows of x are applied to it
 * (a batch reuses each loaded weight), and one 32-bit lane holds a column's (k, k + 1) pair, the
 * operand of VDPBF16PS. models/kernels/quant.py writes the loader's rows into this layout.
 * Each thread takes a contiguous range of panels.
 *
 * Levels (chosen at run time, `bf16_isa_set`; models/kernels/quant.py reads MOE_SERVE_CPU_ISA):
 * - AVX2 + FMA: bf16 -> float32 in registers (a lane's low half shifted left by 16 is the even
 *   k's float32, its high half masked is the odd k's: bf16 is float32's upper half), float32
 *   FMAs: one row against 4 panels (2 rows against 2) at a time, so that 8 accumulators are
 *   independent; up to 6 rows against one panel; above 6 rows each panel is converted once to
 *   float32 (panel_gemm.h's layout) and every 6-row tile runs the float32 micro-kernel on it;
 * - AVX-512F: the same, 16 columns per register;
 * - AVX512-BF16: VDPBF16PS over the activations rounded to bf16 (once per call, to nearest even),
 *   products summed in float32: what llama.cpp's bf16 path computes. It changes the math
 *   (activations in bf16); chosen only where the CPU has AVX512-BF16, and can be forced down
 *   (MOE_SERVE_CPU_ISA=avx512 or avx2).
 * At every level an output element sums its row in k order whatever the batch: results are
 * batch invariant. The AVX-512 levels are compiled with GCC target attributes whatever -march
 * says and dispatched with __builtin_cpu_supports, as linear_quant_cpu.c's levels.
 */
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "panel_gemm.h"

#define BNR 16   /* panel width */
#define BMR 6    /* token rows per tile */
#define BPF 1024 /* bf16 elements ahead to prefetch in a panel (2 KiB) */

enum { BF_AVX2 = 1, BF_AVX512 = 2, BF_AVX512BF16 = 4 }; /* MOE_SERVE_CPU_ISA levels (3: VNNI, = 2 here) */

/* -- AVX2 ------------------------------------------------------------------------------------- */
#define E_FMA(i)                                                            \
    if (mr > i) {                                                           \
        const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);              \
        c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);                          \
        c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);                          \
    }
#define O_FMA(i)                                                            \
    if (mr > i) {                                                           \
        const __m256 a = _mm256_broadcast_ss(x + i * ldx + k + 1);          \
        c##i##0 = _mm256_fmadd_ps(a, w0, c##i##0);                          \
        c##i##1 = _mm256_fmadd_ps(a, w1, c##i##1);                          \
    }
#define C_STORE(i)                                                          \
    if (mr > i) {                                                           \
        _mm256_storeu_ps(y + i * ldy, c##i##0);                             \
        _mm256_storeu_ps(y + i * ldy + 8, c##i##1);                         \
    }

/* y[i * ldy + c] = x[i] . W[c] for i < mr <= 6, c < 16; P one panel [ceil(K/2), 16, 2] */
static inline __attribute__((always_inline)) void btile(const int mr, const float *x, int64_t ldx,
                                                       const uint16_t *P, int64_t K, float *y, int64_t ldy) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        const uint16_t *p = P + k * BNR;
        _mm_prefetch((const char *)(p + BPF), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + BPF + 32), _MM_HINT_T0);
        __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
        __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(p + 16)), 16));
        E_FMA(0) E_FMA(1) E_FMA(2) E_FMA(3) E_FMA(4) E_FMA(5)
        w0 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)p), hi));
        w1 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + 16)), hi));
        O_FMA(0) O_FMA(1) O_FMA(2) O_FMA(3) O_FMA(4) O_FMA(5)
    }
    if (k < K) { /* an odd K's last k: the even half of the last pair */
        const uint16_t *p = P + k * BNR;
        const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(p + 16)), 16));
        E_FMA(0) E_FMA(1) E_FMA(2) E_FMA(3) E_FMA(4) E_FMA(5)
    }
    C_STORE(0) C_STORE(1) C_STORE(2) C_STORE(3) C_STORE(4) C_STORE(5)
}

static void btile_avx2(int mr, const float *x, int64_t ldx, const uint16_t *P, int64_t K, float *y, int64_t ldy) {
    switch (mr) {
    case 1: btile(1, x, ldx, P, K, y, ldy); break;
    case 2: btile(2, x, ldx, P, K, y, ldy); break;
    case 3: btile(3, x, ldx, P, K, y, ldy); break;
    case 4: btile(4, x, ldx, P, K, y, ldy); break;
    case 5: btile(5, x, ldx, P, K, y, ldy); break;
    default: btile(6, x, ldx, P, K, y, ldy); break;
    }
}

/* M <= 2: `np` panels at once (1 row: 4, 2 rows: 2), so that 8 accumulators are independent
 * (one row's two accumulators would wait on the FMA latency, not on memory). Each output
 * element still sums in k order: the same results as `btile`. */
#define EVEN(r) _mm256_castsi256_ps(_mm256_slli_epi32(r, 16))
#define ODD(r) _mm256_castsi256_ps(_mm256_and_si256(r, hi))
#define SP_FMA(p, W)                                                                          \
    if (np > p) {                                                                             \
        const uint16_t *q = P + (p) * pstride + k * BNR;                                      \
        const __m256 w0 = W(_mm256_loadu_si256((const __m256i *)q));                         \
        const __m256 w1 = W(_mm256_loadu_si256((const __m256i *)(q + 16)));                   \
        c0##p##0 = _mm256_fmadd_ps(a0, w0, c0##p##0);                                         \
        c0##p##1 = _mm256_fmadd_ps(a0, w1, c0##p##1);                                         \
        if (mr > 1) {                                                                         \
            c1##p##0 = _mm256_fmadd_ps(a1, w0, c1##p##0);                                     \
            c1##p##1 = _mm256_fmadd_ps(a1, w1, c1##p##1);                                     \
        }                                                                                     \
    }
#define SP_STORE(i, p)                                                                        \
    if (mr > i && np > p) {                                                                   \
        _mm256_storeu_ps(y + i * ldy + (p) * BNR, c##i##p##0);                                \
        _mm256_storeu_ps(y + i * ldy + (p) * BNR + 8, c##i##p##1);                            \
    }

static inline __attribute__((always_inline)) void stile(const int mr, const int np, const float *x, int64_t ldx,
                                                       const uint16_t *P, int64_t K, float *y, int64_t ldy) {
    const int64_t pstride = (K + 1) / 2 * 2 * BNR;
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 c000 = _mm256_setzero_ps(), c001 = c000, c010 = c000, c011 = c000, c020 = c000, c021 = c000,
           c030 = c000, c031 = c000, c100 = c000, c101 = c000, c110 = c000, c111 = c000, c120 = c000, c121 = c000,
           c130 = c000, c131 = c000;
    const float *x1 = x + (mr > 1 ? ldx : 0);
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        _mm_prefetch((const char *)(P + k * BNR + BPF), _MM_HINT_T0);
        _mm_prefetch((const char *)(P + pstride + k * BNR + BPF), _MM_HINT_T0);
        if (np > 2) {
            _mm_prefetch((const char *)(P + 2 * pstride + k * BNR + BPF), _MM_HINT_T0);
            _mm_prefetch((const char *)(P + 3 * pstride + k * BNR + BPF), _MM_HINT_T0);
        }
        __m256 a0 = _mm256_broadcast_ss(x + k), a1 = _mm256_broadcast_ss(x1 + k);
        SP_FMA(0, EVEN) SP_FMA(1, EVEN) SP_FMA(2, EVEN) SP_FMA(3, EVEN)
        a0 = _mm256_broadcast_ss(x + k + 1);
        a1 = _mm256_broadcast_ss(x1 + k + 1);
        SP_FMA(0, ODD) SP_FMA(1, ODD) SP_FMA(2, ODD) SP_FMA(3, ODD)
    }
    if (k < K) {
        const __m256 a0 = _mm256_broadcast_ss(x + k), a1 = _mm256_broadcast_ss(x1 + k);
        SP_FMA(0, EVEN) SP_FMA(1, EVEN) SP_FMA(2, EVEN) SP_FMA(3, EVEN)
    }
    SP_STORE(0, 0) SP_STORE(0, 1) SP_STORE(0, 2) SP_STORE(0, 3)
    SP_STORE(1, 0) SP_STORE(1, 1) SP_STORE(1, 2) SP_STORE(1, 3)
}

/* one panel to float32 panels [K, 16] (panel_gemm.h's layout, for `micro_any`) */
static void unpack_panel(const uint16_t *P, int64_t K, float *F) {
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t k = 0; k < K; k += 2) {
        const __m256i r0 = _mm256_loadu_si256((const __m256i *)(P + k * BNR));
        const __m256i r1 = _mm256_loadu_si256((const __m256i *)(P + k * BNR + 16));
        _mm256_storeu_ps(F + k * BNR, EVEN(r0));
        _mm256_storeu_ps(F + k * BNR + 8, EVEN(r1));
        if (k + 1 < K) {
            _mm256_storeu_ps(F + (k + 1) * BNR, ODD(r0));
            _mm256_storeu_ps(F + (k + 1) * BNR + 8, ODD(r1));
        }
    }
}

/* -- AVX-512F and AVX512-BF16 ----------------------------------------------------------------- */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define BF_HAVE_AVX512 1

#define ZE_FMA(i) \
    if (mr > i) z##i = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w, z##i);
#define ZO_FMA(i) \
    if (mr > i) z##i = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k + 1]), w, z##i);
#define Z_STORE(i) \
    if (mr > i) _mm512_storeu_ps(y + i * ldy, z##i);

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline void ztile(const int mr, const float *x,
                                                                              int64_t ldx, const uint16_t *P,
                                                                              int64_t K, float *y, int64_t ldy) {
    __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0;
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        const uint16_t *p = P + k * BNR;
        _mm_prefetch((const char *)(p + BPF), _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512((const void *)p);
        __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
        ZE_FMA(0) ZE_FMA(1) ZE_FMA(2) ZE_FMA(3) ZE_FMA(4) ZE_FMA(5)
        w = _mm512_castsi512_ps(_mm512_and_si512(raw, hi));
        ZO_FMA(0) ZO_FMA(1) ZO_FMA(2) ZO_FMA(3) ZO_FMA(4) ZO_FMA(5)
    }
    if (k < K) {
        const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512((const void *)(P + k * BNR)), 16));
        ZE_FMA(0) ZE_FMA(1) ZE_FMA(2) ZE_FMA(3) ZE_FMA(4) ZE_FMA(5)
    }
    Z_STORE(0) Z_STORE(1) Z_STORE(2) Z_STORE(3) Z_STORE(4) Z_STORE(5)
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void btile_avx512(int mr, const float *x, int64_t ldx,
                                                                              const uint16_t *P, int64_t K, float *y,
                                                                              int64_t ldy) {
    switch (mr) {
    case 1: ztile(1, x, ldx, P, K, y, ldy); break;
    case 2: ztile(2, x, ldx, P, K, y, ldy); break;
    case 3: ztile(3, x, ldx, P, K, y, ldy); break;
    case 4: ztile(4, x, ldx, P, K, y, ldy); break;
    case 5: ztile(5, x, ldx, P, K, y, ldy); break;
    default: ztile(6, x, ldx, P, K, y, ldy); break;
    }
}

/* AVX512-BF16: x2 holds each row's activations in bf16 as (k, k + 1) pairs, one uint32 per pair */
#define B_DP(i) \
    if (mr > i) z##i = _mm512_dpbf16_ps(z##i, (__m512bh)_mm512_set1_epi32((int)x2[i * K2 + k2]), w);

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void dtile(
    const int mr, const uint32_t *x2, int64_t K2, const uint16_t *P, float *y, int64_t ldy) {
    __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0;
    for (int64_t k2 = 0; k2 < K2; k2++) {
        const uint16_t *p = P + k2 * 2 * BNR;
        _mm_prefetch((const char *)(p + BPF), _MM_HINT_T0);
        const __m512bh w = (__m512bh)_mm512_loadu_si512((const void *)p);
        B_DP(0) B_DP(1) B_DP(2) B_DP(3) B_DP(4) B_DP(5)
    }
    Z_STORE(0) Z_STORE(1) Z_STORE(2) Z_STORE(3) Z_STORE(4) Z_STORE(5)
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void btile_bf16dp(
    int mr, const uint32_t *x2, int64_t K2, const uint16_t *P, float *y, int64_t ldy) {
    switch (mr) {
    case 1: dtile(1, x2, K2, P, y, ldy); break;
    case 2: dtile(2, x2, K2, P, y, ldy); break;
    case 3: dtile(3, x2, K2, P, y, ldy); break;
    case 4: dtile(4, x2, K2, P, y, ldy); break;
    case 5: dtile(5, x2, K2, P, y, ldy); break;
    default: dtile(6, x2, K2, P, y, ldy); break;
    }
}

/* Up to 6 rows against `np` panels at once (np <= 8; 1 row: 8 panels, 2 rows: 4, more: 2), so
 * that enough accumulators are independent: one row against one panel is a single chain of
 * FMAs / VDPBF16PS that waits on their latency (the 2.4B model's 4096 x 2048 q/k/v at one row:
 * 0.50 ms at AVX-512F, 0.37 ms at AVX512-BF16, 0.18 ms for AVX2's 4-panel tile). Every output
 * element still has one accumulator that sums its row in k order: the same results as the
 * one-panel tiles (batch invariant). Panels are `pstride` uint16 apart. */
#define NPMAX 8
__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __attribute__((always_inline)) void zgroup(
    const int mr, const int np, const float *x, int64_t ldx, const uint16_t *P, int64_t pstride, int64_t K, float *y,
    int64_t ldy) {
    __m512 z[BMR][NPMAX];
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) z[i][p] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        __m512i raw[NPMAX];
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) {
            const uint16_t *q = P + p * pstride + k * BNR;
            _mm_prefetch((const char *)(q + BPF), _MM_HINT_T0);
            raw[p] = _mm512_loadu_si512((const void *)q);
        }
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            const __m512 a = _mm512_set1_ps(x[i * ldx + k]);
#pragma GCC unroll 8
            for (int p = 0; p < np; p++)
                z[i][p] = _mm512_fmadd_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(raw[p], 16)), z[i][p]);
        }
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            const __m512 a = _mm512_set1_ps(x[i * ldx + k + 1]);
#pragma GCC unroll 8
            for (int p = 0; p < np; p++)
                z[i][p] = _mm512_fmadd_ps(a, _mm512_castsi512_ps(_mm512_and_si512(raw[p], hi)), z[i][p]);
        }
    }
    if (k < K) {
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) {
            const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512((const void *)(P + p * pstride + k * BNR)), 16));
#pragma GCC unroll 6
            for (int i = 0; i < mr; i++) z[i][p] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w, z[i][p]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) _mm512_storeu_ps(y + i * ldy + p * BNR, z[i][p]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __attribute__((always_inline)) void dgroup(
    const int mr, const int np, const uint32_t *x2, int64_t K2, const uint16_t *P, int64_t pstride, float *y,
    int64_t ldy) {
    __m512 z[BMR][NPMAX];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) z[i][p] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K2; k2++) {
        __m512bh w[NPMAX];
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) {
            const uint16_t *q = P + p * pstride + k2 * 2 * BNR;
            _mm_prefetch((const char *)(q + BPF), _MM_HINT_T0);
            w[p] = (__m512bh)_mm512_loadu_si512((const void *)q);
        }
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)x2[i * K2 + k2]);
#pragma GCC unroll 8
            for (int p = 0; p < np; p++) z[i][p] = _mm512_dpbf16_ps(z[i][p], a, w[p]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) _mm512_storeu_ps(y + i * ldy + p * BNR, z[i][p]);
}

/* panels a group of `mr` rows takes at once */
static inline int group_panels(int mr) { return mr == 1 ? 8 : mr == 2 ? 4 : 2; }

#define GROUP_CASES(F, ...)                                                 \
    switch (mr) {                                                           \
    case 1: F(1, 8, __VA_ARGS__); break;                                    \
    case 2: F(2, 4, __VA_ARGS__); break;                                    \
    case 3: F(3, 2, __VA_ARGS__); break;                                    \
    case 4: F(4, 2, __VA_ARGS__); break;                                    \
    case 5: F(5, 2, __VA_ARGS__); break;                                    \
    default: F(6, 2, __VA_ARGS__); break;                                   \
    }

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void zgroup_any(int mr, const float *x, int64_t ldx,
                                                                            const uint16_t *P, int64_t pstride,
                                                                            int64_t K, float *y, int64_t ldy) {
    GROUP_CASES(zgroup, x, ldx, P, pstride, K, y, ldy)
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void dgroup_any(
    int mr, const uint32_t *x2, int64_t K2, const uint16_t *P, int64_t pstride, float *y, int64_t ldy) {
    GROUP_CASES(dgroup, x2, K2, P, pstride, y, ldy)
}
#else
#define BF_HAVE_AVX512 0
#endif

static int g_bf_isa = 0; /* 0: not chosen yet */

int bf16_isa_best(void) {
#if BF_HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return __builtin_cpu_supports("avx512bf16") ? BF_AVX512BF16 : BF_AVX512;
#endif
    return BF_AVX2;
}

/* level: 0 the best; 1 AVX2; 2 or 3 AVX-512F; 4 AVX512-BF16. Returns the level in use, -1 above the best. */
int bf16_isa_set(int level) {
    const int best = bf16_isa_best();
    if (level == 0) level = best;
    if (level == 3) level = BF_AVX512; /* VNNI: the quantized kernels' level; no integer dots here */
    if (level < BF_AVX2 || level > best || (level != BF_AVX2 && level != BF_AVX512 && level != BF_AVX512BF16))
        return -1;
    g_bf_isa = level;
    return level;
}

int bf16_isa_get(void) {
    if (g_bf_isa == 0) g_bf_isa = bf16_isa_best();
    return g_bf_isa;
}

typedef struct {
    const float *x;
    const uint16_t *W;
    const uint32_t *x2; /* the activations in bf16 pairs (AVX512-BF16 level), else NULL */
    const float *bias;
    float *y;
    float *buf; /* one panel in float32 [K, 16] (AVX2, M > 6), else NULL */
    int64_t M, N, K, ldx, p0, p1;
    int isa;
} blin_job_t;

/* AVX2: rows of x against panels [p0, p1) */
static void blin_avx2(const blin_job_t *J) {
    const int64_t M = J->M, N = J->N, K = J->K, K2 = (K + 1) / 2, ldx = J->ldx;
    for (int64_t j = J->p0; j < J->p1;) {
        const uint16_t *P = J->W + j * K2 * 2 * BNR;
        float *y = J->y + j * BNR;
        if (M == 1 && J->p1 - j >= 4) {
            stile(1, 4, J->x, ldx, P, K, y, N);
            j += 4;
        } else if (M <= 2 && J->p1 - j >= 2) {
            if (M == 1) stile(1, 2, J->x, ldx, P, K, y, N);
            else stile(2, 2, J->x, ldx, P, K, y, N);
            j += 2;
        } else if (M <= BMR) {
            btile_avx2((int)M, J->x, ldx, P, K, y, N);
            j++;
        } else { /* the panel converted once, then every tile of rows against it */
            unpack_panel(P, K, J->buf);
            for (int64_t m = 0; m < M; m += MR) {
                const int mr = (int)(M - m < MR ? M - m : MR);
                micro_any(mr, J->x + m * ldx, ldx, J->buf, K, y + m * N, N);
            }
            j++;
        }
    }
}

static void *blin_range(void *arg) {
    const blin_job_t *J = (const blin_job_t *)arg;
    const int64_t M = J->M, N = J->N, K = J->K, K2 = (K + 1) / 2, ldx = J->ldx;
    if (J->isa == BF_AVX2) {
        blin_avx2(J);
    } else {
#if BF_HAVE_AVX512
        /* groups of panels (group_panels of the row tile's size), the rest one panel at a time */
        const int64_t pstride = K2 * 2 * BNR;
        const int np = group_panels((int)(M < BMR ? M : BMR));
        for (int64_t j = J->p0; j < J->p1;) {
            const uint16_t *P = J->W + j * pstride;
            const int group = J->p1 - j >= np;
            for (int64_t m = 0; m < M; m += BMR) {
                const int mr = (int)(M - m < BMR ? M - m : BMR);
                float *y = J->y + m * N + j * BNR;
                if (group && group_panels(mr) == np) {
                    if (J->isa == BF_AVX512BF16) dgroup_any(mr, J->x2 + m * K2, K2, P, pstride, y, N);
                    else zgroup_any(mr, J->x + m * ldx, ldx, P, pstride, K, y, N);
                } else {
                    for (int p = 0; p < (group ? np : 1); p++) {
                        if (J->isa == BF_AVX512BF16) btile_bf16dp(mr, J->x2 + m * K2, K2, P + p * pstride, y + p * BNR, N);
                        else btile_avx512(mr, J->x + m * ldx, ldx, P + p * pstride, K, y + p * BNR, N);
                    }
                }
            }
            j += group ? np : 1;
        }
#endif
    }
    if (J->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = J->p0 * BNR; n < J->p1 * BNR; n++) J->y[m * N + n] += J->bias[n];
    return NULL;
}

/* Returns 0 on success, 1 when out of memory, 3 for bad shapes. x [M, K] rows ldx apart; W the
 * panels [N/16, ceil(K/2), 16, 2] (uint16); bias [N] or NULL; y [M, N] (overwritten). */
int linear_bf16(const float *x, int64_t ldx, const uint16_t *W, const float *bias, float *y, int64_t M, int64_t N,
                int64_t K, int nthreads) {
    if (M < 0 || N < 1 || N % BNR || K < 1 || ldx < K) return 3;
    if (M == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t panels = N / BNR, K2 = (K + 1) / 2;
    if (nthreads > panels) nthreads = (int)panels;
    const int isa = bf16_isa_get();
    uint32_t *x2 = NULL;
    if (isa == BF_AVX512BF16) {
        x2 = (uint32_t *)malloc((size_t)(M * K2) * sizeof(uint32_t));
        if (!x2) return 1;
        bf16_pairs(x, ldx, M, K, x2);
    }
    float *buf = NULL;
    if (isa == BF_AVX2 && M > BMR) {
        buf = (float *)malloc((size_t)nthreads * (size_t)(K + 1) * BNR * sizeof(float));
        if (!buf) {
            free(x2);
            return 1;
        }
    }
    blin_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++)
        jobs[t] = (blin_job_t){x, W, x2, bias, y, buf ? buf + (size_t)t * (size_t)(K + 1) * BNR : NULL, M, N, K, ldx,
                               panels * t / nthreads, panels * (t + 1) / nthreads, isa};
    run_jobs(blin_range, jobs, sizeof jobs[0], nthreads);
    free(buf);
    free(x2);
    return 0;
}

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int bf16_isa_best(void) { return 0; }
int bf16_isa_set(int level) { return -1; }
int bf16_isa_get(void) { return 0; }
int linear_bf16(const float *x, int64_t ldx, const uint16_t *W, const float *bias, float *y, int64_t M, int64_t N,
                int64_t K, int nthreads) { return 4; }
#endif
