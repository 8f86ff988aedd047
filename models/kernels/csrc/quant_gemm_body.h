/* One instruction-set level of the quantized dot-product kernel (quant_gemm.h), included by
 * linear_quant_cpu.c once per level inside a `#pragma GCC target` region, with:
 *   QG_NAME(x)  the level's name for x;   QG_WIDE  1: two blocks per 512-bit step (AVX-512BW);
 *   QG_VNNI     1: VPDPBUSD dot products (AVX512-VNNI) instead of VPMADDUBSW + VPMADDWD.
 *
 * The micro-kernel (every level alike): a tile of up to QTILE_M activation rows times one
 * prepared int8 weight row, QKC = 8 blocks per step. Per block, the exact int32 dot product of
 * 32 int8 pairs as 8 partial sums (|x| times sign(w, x): VPMADDUBSW + VPMADDWD, or VPDPBUSD);
 * the 8 blocks' partial sums are transposed and summed into one vector whose lane j holds block
 * j's dot product, converted once and scaled by (weight scale x activation scale) of the 8 blocks
 * in one multiply, into one 8-lane accumulator per activation row (QF_Q4Z adds min x d*sum(q)
 * lane by lane). The weight's 8 blocks stay in L1 while the tile's rows use them; the scaling
 * costs 3 instructions per 8 blocks instead of 3 per block. At the end the 8 lanes are summed in
 * a fixed order. The same instructions compute an output whatever the tile: batch invariant. */

/* lane j = the sum of v_j's 8 lanes */
static inline __attribute__((always_inline)) __m256i QG_NAME(tsum8)(__m256i v0, __m256i v1, __m256i v2, __m256i v3,
                                                                     __m256i v4, __m256i v5, __m256i v6, __m256i v7) {
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v4, v5), _mm256_hadd_epi32(v6, v7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* block dot product: 8 int32 partial sums of w . x over 32 int8 (ax = |x|; no saturation: |w|, |x| <= 127) */
static inline __attribute__((always_inline)) __m256i QG_NAME(bdot)(const int8_t *w, const int8_t *x, const int8_t *ax) {
    const __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), _mm256_loadu_si256((const __m256i *)x));
    const __m256i av = _mm256_loadu_si256((const __m256i *)ax);
#if QG_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), av, sw);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(av, sw), _mm256_set1_epi16(1));
#endif
}

#if QG_WIDE
/* two consecutive blocks in one 512-bit step: the low half of the result is block 0's, the high block 1's */
static inline __attribute__((always_inline)) __m512i QG_NAME(bdot2)(const int8_t *w, const int8_t *x, const int8_t *ax) {
    const __m512i wv = _mm512_loadu_si512((const void *)w), xv = _mm512_loadu_si512((const void *)x);
    const __m512i sw = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xv), _mm512_setzero_si512(), wv);
    const __m512i av = _mm512_loadu_si512((const void *)ax);
#if QG_VNNI
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), av, sw);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(av, sw), _mm512_set1_epi16(1));
#endif
}
#define QG_PAIR(j, a, b)                                                                                    \
    const __m512i z##j = QG_NAME(bdot2)(w + (j) * QK, x + (j) * QK, ax + (j) * QK);                        \
    const __m256i a = _mm512_castsi512_si256(z##j), b = _mm512_extracti64x4_epi64(z##j, 1);
#endif

/* The 8 blocks' dot products of one row (lane j: block j); blocks >= nbk count 0. */
static inline __attribute__((always_inline)) __m256i QG_NAME(dots8)(const int8_t *w, const int8_t *x, const int8_t *ax,
                                                                      const int nbk) {
    if (nbk == QKC) {
#if QG_WIDE
        QG_PAIR(0, v0, v1) QG_PAIR(2, v2, v3) QG_PAIR(4, v4, v5) QG_PAIR(6, v6, v7)
#else
        const __m256i v0 = QG_NAME(bdot)(w, x, ax), v1 = QG_NAME(bdot)(w + QK, x + QK, ax + QK);
        const __m256i v2 = QG_NAME(bdot)(w + 2 * QK, x + 2 * QK, ax + 2 * QK);
        const __m256i v3 = QG_NAME(bdot)(w + 3 * QK, x + 3 * QK, ax + 3 * QK);
        const __m256i v4 = QG_NAME(bdot)(w + 4 * QK, x + 4 * QK, ax + 4 * QK);
        const __m256i v5 = QG_NAME(bdot)(w + 5 * QK, x + 5 * QK, ax + 5 * QK);
        const __m256i v6 = QG_NAME(bdot)(w + 6 * QK, x + 6 * QK, ax + 6 * QK);
        const __m256i v7 = QG_NAME(bdot)(w + 7 * QK, x + 7 * QK, ax + 7 * QK);
#endif
        return QG_NAME(tsum8)(v0, v1, v2, v3, v4, v5, v6, v7);
    }
    __m256i v[QKC];
    for (int j = 0; j < QKC; j++) v[j] = j < nbk ? QG_NAME(bdot)(w + j * QK, x + j * QK, ax + j * QK) : _mm256_setzero_si256();
    return QG_NAME(tsum8)(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
}

/* 8 fp16 values from p (n < 8: the first n, then zeros) as floats */
static inline __attribute__((always_inline)) __m256 QG_NAME(half8)(const uint16_t *p, const int n) {
    if (n == QKC) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[QKC] = {0};
    for (int j = 0; j < n; j++) t[j] = p[j];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

static inline __attribute__((always_inline)) __m256 QG_NAME(float8)(const float *p, const __m256i mask, const int n) {
    return n == QKC ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

#define QG_ROW(i)                                                                                          \
    if (mr > i) {                                                                                          \
        const int64_t row = m0 + i;                                                                        \
        const __m256i dots = QG_NAME(dots8)(w, A->q + row * K + b0 * QK, A->a + row * K + b0 * QK, nbk);   \
        const __m256 sc = _mm256_mul_ps(dwv, QG_NAME(float8)(A->d + row * nb + b0, mask, nbk));            \
        acc##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), sc, acc##i);                                    \
        if (fmt == QF_Q4Z) acc##i = _mm256_fmadd_ps(mwv, QG_NAME(float8)(A->s + row * nb + b0, mask, nbk), acc##i); \
    }

/* one step of QKC blocks (nbk of them: QKC, or fewer at the end of a row) */
static inline __attribute__((always_inline)) void QG_NAME(step)(const int fmt, const int mr, const int nbk,
                                                                 const qact_t *A, int64_t m0, const int8_t *wrow,
                                                                 const uint16_t *wd, const uint16_t *wm, int64_t b0,
                                                                 int64_t nb, __m256 *acc) {
    const int64_t K = nb * QK;
    const int8_t *w = wrow + b0 * QK;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nbk), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 dwv = fmt == QF_Q8C ? _mm256_set1_ps(_cvtsh_ss(wd[0])) : QG_NAME(half8)(wd + b0, nbk);
    const __m256 mwv = fmt == QF_Q4Z ? QG_NAME(half8)(wm + b0, nbk) : _mm256_setzero_ps();
    __m256 acc0 = acc[0], acc1 = acc[1], acc2 = acc[2], acc3 = acc[3];
    QG_ROW(0) QG_ROW(1) QG_ROW(2) QG_ROW(3)
    acc[0] = acc0, acc[1] = acc1, acc[2] = acc2, acc[3] = acc3;
}

static inline float QG_NAME(hsum)(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void QG_NAME(tile)(const int fmt, const int mr, const qact_t *A,
                                                                 int64_t m0, const qmat_t *W, const int8_t *wq,
                                                                 int64_t r0, int nr, float *y, int64_t ldy) {
    const int64_t K = W->K, nb = K / QK, S = fmt == QF_Q8C ? 1 : nb;
    for (int c = 0; c < nr; c++) {
        const int64_t r = r0 + c;
        const int8_t *wrow = wq + c * K;
        const uint16_t *wd = W->d + r * S, *wm = fmt == QF_Q4Z ? W->m + r * nb : NULL;
        __m256 acc[QTILE_M] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t b0 = 0;
        for (; b0 + QKC <= nb; b0 += QKC) QG_NAME(step)(fmt, mr, QKC, A, m0, wrow, wd, wm, b0, nb, acc);
        if (b0 < nb) QG_NAME(step)(fmt, mr, (int)(nb - b0), A, m0, wrow, wd, wm, b0, nb, acc);
        for (int i = 0; i < mr; i++) y[i * ldy + c] = QG_NAME(hsum)(acc[i]);
    }
}

#define QG_MR(fmt)                                                                   \
    switch (mr) {                                                                    \
    case 1: QG_NAME(tile)(fmt, 1, A, m0, W, wq, r0, nr, y, ldy); break;              \
    case 2: QG_NAME(tile)(fmt, 2, A, m0, W, wq, r0, nr, y, ldy); break;              \
    case 3: QG_NAME(tile)(fmt, 3, A, m0, W, wq, r0, nr, y, ldy); break;              \
    default: QG_NAME(tile)(fmt, 4, A, m0, W, wq, r0, nr, y, ldy); break;             \
    }

static void QG_NAME(qgemm_tile)(const qact_t *A, int64_t m0, int mr, const qmat_t *W, const int8_t *wq, int64_t r0,
                                int nr, float *y, int64_t ldy) {
    switch (W->fmt) {
    case QF_Q8: QG_MR(QF_Q8) break;
    case QF_Q8C: QG_MR(QF_Q8C) break;
    case QF_Q4: QG_MR(QF_Q4) break;
    default: QG_MR(QF_Q4Z) break;
    }
}

#undef QG_ROW
#undef QG_MR
#if QG_WIDE
#undef QG_PAIR
#endif
