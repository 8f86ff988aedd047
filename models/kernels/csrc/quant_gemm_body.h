/* One instruction-set level of the quantized dot-product kernel (quant_gemm.h), included by
 * linear_quant_cpu.c once per level inside a `#pragma GCC target` region, with:
 *   QG_NAME(x)  the level's name for x;   QG_WIDE  1: two blocks per 512-bit step (AVX-512BW);
 *   QG_VNNI     1: VPDPBUSD dot products (AVX512-VNNI) instead of VPMADDUBSW + VPMADDWD. */

/* 32 weights of block b of a row as int8 (int4: q - 8 symmetric, q as is with a zero point) */
static inline __attribute__((always_inline)) __m256i QG_NAME(load_w)(const int fmt, const uint8_t *row, int64_t b) {
    if (fmt <= QF_Q8C) return _mm256_loadu_si256((const __m256i *)(row + b * QK));
    const __m128i t = _mm_loadu_si128((const __m128i *)(row + b * (QK / 2)));
    __m256i v = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    return fmt == QF_Q4 ? _mm256_sub_epi8(v, _mm256_set1_epi8(8)) : v;
}

/* sum of w[i] * x[i] over a block, as 8 int32 partial sums (|w| <= 127, |x| <= 127: no saturation) */
static inline __attribute__((always_inline)) __m256i QG_NAME(dot)(__m256i w, __m256i x) {
    const __m256i ax = _mm256_sign_epi8(x, x), sw = _mm256_sign_epi8(w, x);
#if QG_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
#endif
}

#if QG_WIDE
static inline __attribute__((always_inline)) __m512i QG_NAME(load_w2)(const int fmt, const uint8_t *row, int64_t b) {
    if (fmt <= QF_Q8C) return _mm512_loadu_si512((const void *)(row + b * QK));
    return _mm512_inserti64x4(_mm512_castsi256_si512(QG_NAME(load_w)(fmt, row, b)), QG_NAME(load_w)(fmt, row, b + 1), 1);
}

static inline __attribute__((always_inline)) __m512i QG_NAME(dot2)(__m512i w, __m512i x) {
    const __m512i ax = _mm512_abs_epi8(x);
    const __m512i sw = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(x), _mm512_setzero_si512(), w);
#if QG_VNNI
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sw);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(ax, sw), _mm512_set1_epi16(1));
#endif
}
#endif

#define QG_ROW(i)                                                                                          \
    if (mr > i) {                                                                                          \
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(A->q + (m0 + i) * K + b * QK));            \
        acc##i = _mm256_fmadd_ps(_mm256_set1_ps(dw * A->d[(m0 + i) * nb + b]),                             \
                                 _mm256_cvtepi32_ps(QG_NAME(dot)(w, xv)), acc##i);                         \
        if (fmt == QF_Q4Z) zs##i += mw * A->s[(m0 + i) * nb + b];                                          \
    }
#define QG_ROW2(i)                                                                                         \
    if (mr > i) {                                                                                          \
        const __m512i xv = _mm512_loadu_si512((const void *)(A->q + (m0 + i) * K + b * QK));               \
        const __m512 sc = _mm512_castpd_ps(_mm512_insertf64x4(                                             \
            _mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(dw0 * A->d[(m0 + i) * nb + b]))),       \
            _mm256_castps_pd(_mm256_set1_ps(dw1 * A->d[(m0 + i) * nb + b + 1])), 1));                      \
        wacc##i = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(QG_NAME(dot2)(w2, xv)), wacc##i);                 \
        if (fmt == QF_Q4Z) zs##i += mw0 * A->s[(m0 + i) * nb + b] + mw1 * A->s[(m0 + i) * nb + b + 1];     \
    }
#define QG_STORE(i)                                                                                        \
    if (mr > i) y[i * ldy + c] = QG_NAME(hsum)(acc##i, wacc##i) + zs##i;

#if QG_WIDE
static inline float QG_NAME(hsum)(__m256 a, __m512 w) {
    a = _mm256_add_ps(a, _mm256_add_ps(_mm512_castps512_ps256(w), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))));
#else
static inline float QG_NAME(hsum)(__m256 a, int unused) {
    (void)unused;
#endif
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void QG_NAME(tile)(const int fmt, const int mr, const qact_t *A,
                                                                 int64_t m0, const qmat_t *W, int64_t r0, int nr,
                                                                 float *y, int64_t ldy) {
    const int64_t K = W->K, nb = K / QK, S = fmt == QF_Q8C ? 1 : nb, rb = qrow_bytes(fmt, K);
    for (int c = 0; c < nr; c++) {
        const int64_t r = r0 + c;
        const uint8_t *row = W->q + r * rb;
        const uint16_t *wd = W->d + r * S;
        const uint16_t *wm = fmt == QF_Q4Z ? W->m + r * nb : NULL;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        float zs0 = 0.f, zs1 = 0.f, zs2 = 0.f, zs3 = 0.f;
        int64_t b = 0;
#if QG_WIDE
        __m512 wacc0 = _mm512_setzero_ps(), wacc1 = wacc0, wacc2 = wacc0, wacc3 = wacc0;
        for (; b + 1 < nb; b += 2) {
            _mm_prefetch((const char *)(row + b * (rb / nb) + 512), _MM_HINT_T0);
            const __m512i w2 = QG_NAME(load_w2)(fmt, row, b);
            const float dw0 = _cvtsh_ss(wd[S == 1 ? 0 : b]), dw1 = _cvtsh_ss(wd[S == 1 ? 0 : b + 1]);
            const float mw0 = wm ? _cvtsh_ss(wm[b]) : 0.f, mw1 = wm ? _cvtsh_ss(wm[b + 1]) : 0.f;
            QG_ROW2(0) QG_ROW2(1) QG_ROW2(2) QG_ROW2(3)
        }
#else
        const int wacc0 = 0, wacc1 = 0, wacc2 = 0, wacc3 = 0;
#endif
        for (; b < nb; b++) {
            _mm_prefetch((const char *)(row + b * (rb / nb) + 512), _MM_HINT_T0);
            const __m256i w = QG_NAME(load_w)(fmt, row, b);
            const float dw = _cvtsh_ss(wd[S == 1 ? 0 : b]);
            const float mw = wm ? _cvtsh_ss(wm[b]) : 0.f;
            QG_ROW(0) QG_ROW(1) QG_ROW(2) QG_ROW(3)
        }
        QG_STORE(0) QG_STORE(1) QG_STORE(2) QG_STORE(3)
    }
}

#define QG_MR(fmt)                                                                   \
    switch (mr) {                                                                    \
    case 1: QG_NAME(tile)(fmt, 1, A, m0, W, r0, nr, y, ldy); break;                  \
    case 2: QG_NAME(tile)(fmt, 2, A, m0, W, r0, nr, y, ldy); break;                  \
    case 3: QG_NAME(tile)(fmt, 3, A, m0, W, r0, nr, y, ldy); break;                  \
    default: QG_NAME(tile)(fmt, 4, A, m0, W, r0, nr, y, ldy); break;                 \
    }

static void QG_NAME(qgemm_tile)(const qact_t *A, int64_t m0, int mr, const qmat_t *W, int64_t r0, int nr, float *y,
                                int64_t ldy) {
    switch (W->fmt) {
    case QF_Q8: QG_MR(QF_Q8) break;
    case QF_Q8C: QG_MR(QF_Q8C) break;
    case QF_Q4: QG_MR(QF_Q4) break;
    default: QG_MR(QF_Q4Z) break;
    }
}

#undef QG_ROW
#undef QG_ROW2
#undef QG_STORE
#undef QG_MR
