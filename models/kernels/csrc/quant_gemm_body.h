/* One instruction-set level of the quantized GEMM micro-kernel (quant_gemm.h), included by
 * linear_quant_cpu.c once per level inside a `#pragma GCC target` region, with:
 *   QG_NAME(x)  the level's name for x;
 *   QG_VNNI     1: VPDPBUSD dot products (AVX512-VNNI, 256-bit) instead of VPMADDUBSW + VPMADDWD.
 * Every level runs the same tiling on the same prepared panels (qpanel_t), so they compute the
 * same exact int32 block sums and the same float32 operations.
 *
 * A tile: up to QTILE_M activation rows times 8 weight rows (half of a 16-row panel). Per block of
 * 32 along k and per group of 4 k, the panel holds the 8 rows' 4 weights side by side (32 bytes):
 * one broadcast of the row's 4 activations and one VPMADDUBSW give the 8 rows' partial sums in the
 * 8 lanes, no horizontal sums. int4 (weights 0..15, unsigned operand; activations signed): the
 * 16-bit partial sums of the block's 8 groups add up in int16 (at most 16 x 15 x 127 = 30480),
 * one VPMADDWD per block; int8: |x| (broadcast too) times w sign(x), VPMADDWD per group. Per block the int32
 * sums are converted once and scaled by the rows' scales x the activation's scale (one multiply),
 * and for int4 the zero point (QF_Q4: -8 d; QF_Q4Z: m) times the activation block's d * sum(q).
 * Each output sums its blocks in k order in one float lane whatever the tile: batch invariant. */

#define QG_BC(i, g) _mm256_set1_epi32(*(const int32_t *)(A->q + (m0 + i) * K + b * QK + 4 * (g)))
#define QG_BCA(i, g) _mm256_set1_epi32(*(const int32_t *)(A->a + (m0 + i) * K + b * QK + 4 * (g)))

#if QG_VNNI
#define QG_G4(i, g) if (mr > i) a##i = _mm256_dpbusd_epi32(a##i, wv, QG_BC(i, g));
#define QG_G8(i, g) if (mr > i) a##i = _mm256_dpbusd_epi32(a##i, QG_BCA(i, g), _mm256_sign_epi8(wv, QG_BC(i, g)));
#else
#define QG_G4(i, g) if (mr > i) a##i = _mm256_add_epi16(a##i, _mm256_maddubs_epi16(wv, QG_BC(i, g)));
#define QG_G8(i, g)                                                                                         \
    if (mr > i) a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(_mm256_maddubs_epi16(QG_BCA(i, g), _mm256_sign_epi8(wv, QG_BC(i, g))), ones));
#endif

#define QG_GROUP(g)                                                                                        \
    {                                                                                                      \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wp + (g) * 8 * QPW));                       \
        if (q4) {                                                                                          \
            QG_G4(0, g) QG_G4(1, g) QG_G4(2, g) QG_G4(3, g)                                                \
        } else {                                                                                           \
            QG_G8(0, g) QG_G8(1, g) QG_G8(2, g) QG_G8(3, g)                                                \
        }                                                                                                  \
    }

#if QG_VNNI
#define QG_SUM(i) a##i
#else
#define QG_SUM(i) (q4 ? _mm256_madd_epi16(a##i, ones) : a##i)
#endif

#define QG_SCALE(i)                                                                                        \
    if (mr > i) {                                                                                          \
        const int64_t row = m0 + i;                                                                        \
        f##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(QG_SUM(i)), _mm256_mul_ps(sc, _mm256_broadcast_ss(A->d + row * nb + b)), f##i); \
        if (q4) f##i = _mm256_fmadd_ps(mn, _mm256_broadcast_ss(A->s + row * nb + b), f##i);                 \
    }

#define QG_STORE(i)                                                                                        \
    if (mr > i) {                                                                                          \
        if (nr == 8) _mm256_storeu_ps(y + i * ldy, f##i);                                                   \
        else {                                                                                             \
            float t[8];                                                                                    \
            _mm256_storeu_ps(t, f##i);                                                                     \
            for (int c = 0; c < nr; c++) y[i * ldy + c] = t[c];                                            \
        }                                                                                                  \
    }

/* rows [m0, m0 + mr) of A times rows [8h, 8h + nr) of the panel P: y[i * ldy + c] */
static inline __attribute__((always_inline)) void QG_NAME(tile8)(const int q4, const int mr, const qact_t *A,
                                                                  int64_t m0, const qpanel_t *P, int h, int nr,
                                                                  float *y, int64_t ldy) {
    const int64_t K = P->K, nb = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones; /* unused by the VNNI level */
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *wp = P->w + b * QK * 2 * QPW + h * 4 * QPW;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        QG_GROUP(0) QG_GROUP(1) QG_GROUP(2) QG_GROUP(3) QG_GROUP(4) QG_GROUP(5) QG_GROUP(6) QG_GROUP(7)
        const __m256 sc = _mm256_loadu_ps(P->sc + b * 2 * QPW + h * QPW);
        const __m256 mn = q4 ? _mm256_loadu_ps(P->mn + b * 2 * QPW + h * QPW) : _mm256_setzero_ps();
        QG_SCALE(0) QG_SCALE(1) QG_SCALE(2) QG_SCALE(3)
    }
    QG_STORE(0) QG_STORE(1) QG_STORE(2) QG_STORE(3)
}

/* lane j = the sum of v_j's 8 lanes */
static inline __attribute__((always_inline)) __m256i QG_NAME(tsum8)(const __m256i *v) {
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* p[0], p[stride], ..., p[7 stride] (nr < 8: the first nr, then zeros, through t) */
static inline __attribute__((always_inline)) __m128i QG_NAME(gather8)(const uint16_t *p, int64_t stride, int nr, uint16_t *t) {
    if (nr == 8) {
        __m128i v = _mm_cvtsi32_si128(p[0]);
        v = _mm_insert_epi16(v, p[stride], 1);
        v = _mm_insert_epi16(v, p[2 * stride], 2);
        v = _mm_insert_epi16(v, p[3 * stride], 3);
        v = _mm_insert_epi16(v, p[4 * stride], 4);
        v = _mm_insert_epi16(v, p[5 * stride], 5);
        v = _mm_insert_epi16(v, p[6 * stride], 6);
        return _mm_insert_epi16(v, p[7 * stride], 7);
    }
    for (int c = 0; c < 8; c++) t[c] = c < nr ? p[c * stride] : 0;
    return _mm_loadu_si128((const __m128i *)t);
}

/* The same outputs as tile8, bit for bit, for one activation row, reading W's rows as they are
 * (no panel): per block, the 8 rows' exact int32 sums from
 * row-wise dot products, transposed into the 8 lanes, then tile8's float32 operations. Cheaper
 * than preparing a panel when the batch has a row or two (decode). */
static inline __attribute__((always_inline)) void QG_NAME(row8)(const int fmt, const qact_t *A, int64_t m, const qmat_t *W,
                                                                 int64_t r0, int nr, float *y) {
    const int64_t K = W->K, nb = K / QK, rb = qrow_bytes(fmt, K), S = fmt == QF_Q8C ? 1 : nb;
    const int q4 = fmt >= QF_Q4;
    const __m256i lo = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    __m256 f = _mm256_setzero_ps();
    const uint8_t *wr = W->q + r0 * rb;
    uint16_t hd[8], hm[8];
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(A->q + m * K + b * QK));
        const __m256i av = _mm256_loadu_si256((const __m256i *)(A->a + m * K + b * QK));
        __m256i v[8];
        for (int c = 0; c < 8; c++) {
            if (c >= nr) {
                v[c] = _mm256_setzero_si256();
                continue;
            }
            /* the same spot 8 rows on (the next call's rows): the 8 rows are read block by block, across */
            _mm_prefetch((const char *)(wr + (c + 8) * rb + b * (rb / nb)), _MM_HINT_T0);
            if (q4) {
                const __m128i t = _mm_loadu_si128((const __m128i *)(wr + c * rb + b * (QK / 2)));
                const __m256i wu = _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1), lo);
#if QG_VNNI
                v[c] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, xv);
#else
                v[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones);
#endif
            } else {
                const __m256i sw = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(wr + c * rb + b * QK)), xv);
#if QG_VNNI
                v[c] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), av, sw);
#else
                v[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(av, sw), ones);
#endif
            }
        }
        /* the rows' scales of the block (qpanel_prepare's sc and mn, the same values) */
        const __m256 sc = _mm256_cvtph_ps(QG_NAME(gather8)(W->d + r0 * S + (S == 1 ? 0 : b), S, nr, hd));
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(QG_NAME(tsum8)(v)), _mm256_mul_ps(sc, _mm256_broadcast_ss(A->d + m * nb + b)), f);
        if (fmt == QF_Q4) f = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(-8.f)), _mm256_broadcast_ss(A->s + m * nb + b), f);
        if (fmt == QF_Q4Z) {
            const __m256 mn = _mm256_cvtph_ps(QG_NAME(gather8)(W->m + r0 * nb + b, nb, nr, hm));
            f = _mm256_fmadd_ps(mn, _mm256_broadcast_ss(A->s + m * nb + b), f);
        }
    }
    if (nr == 8) _mm256_storeu_ps(y, f);
    else {
        float t[8];
        _mm256_storeu_ps(t, f);
        for (int c = 0; c < nr; c++) y[c] = t[c];
    }
}

static void QG_NAME(qgemm_row)(const qact_t *A, int64_t m, const qmat_t *W, int64_t r0, int nr, float *y0) {
    for (int h = 0; h * QPW < nr; h++) {
        const int n = nr - h * QPW < QPW ? nr - h * QPW : QPW;
        const int64_t r = r0 + h * QPW;
        float *y = y0 + h * QPW;
        switch (W->fmt) {
        case QF_Q8: QG_NAME(row8)(QF_Q8, A, m, W, r, n, y); break;
        case QF_Q8C: QG_NAME(row8)(QF_Q8C, A, m, W, r, n, y); break;
        case QF_Q4: QG_NAME(row8)(QF_Q4, A, m, W, r, n, y); break;
        default: QG_NAME(row8)(QF_Q4Z, A, m, W, r, n, y); break;
        }
    }
}

#define QG_MR(q4)                                                                   \
    switch (mr) {                                                                   \
    case 1: QG_NAME(tile8)(q4, 1, A, m0, P, h, n, y, ldy); break;                   \
    case 2: QG_NAME(tile8)(q4, 2, A, m0, P, h, n, y, ldy); break;                   \
    case 3: QG_NAME(tile8)(q4, 3, A, m0, P, h, n, y, ldy); break;                   \
    default: QG_NAME(tile8)(q4, 4, A, m0, P, h, n, y, ldy); break;                  \
    }

static void QG_NAME(qgemm_tile)(const qact_t *A, int64_t m0, int mr, const qpanel_t *P, float *y0, int64_t ldy) {
    for (int h = 0; h * QPW < P->nr; h++) {
        const int n = P->nr - h * QPW < QPW ? P->nr - h * QPW : QPW;
        float *y = y0 + h * QPW;
        if (P->fmt >= QF_Q4) {
            QG_MR(1)
        } else {
            QG_MR(0)
        }
    }
}

#undef QG_BC
#undef QG_BCA
#undef QG_G4
#undef QG_G8
#undef QG_GROUP
#undef QG_SUM
#undef QG_SCALE
#undef QG_STORE
#undef QG_MR
