/* One instruction-set level of the quantized GEMM micro-kernel (quant_gemm.h), included by
 * linear_quant_cpu.c once per level inside a `#pragma GCC target` region, with:
 *   QG_NAME(x)  the level's name for x;
 *   QG_VNNI     1: VPDPBUSD dot products (AVX512-VNNI, 256-bit) instead of VPMADDUBSW + VPMADDWD.
 * Every level runs the same tiling on the same stored weights, so they compute the same exact
 * int32 block sums and the same float32 operations.
 *
 * A tile: up to QTILE_M activation rows times one group of 8 weight rows, read as stored (the
 * kernel order of quant_gemm.h: per block and group g of 4 along k, the 8 rows' 4 weights side by
 * side, 32 bytes; int4 packs groups g and g + 4 into one 32-byte load's low and high nibbles).
 * One broadcast of an activation row's 4 values and one VPMADDUBSW give the 8 rows' partial sums
 * in the 8 lanes, no horizontal sums, no transposes. int4 (weights 0..15, unsigned operand;
 * activations signed): the 16-bit partial sums of the block's 8 groups add up in int16 (at most
 * 16 x 15 x 127 = 30480), one VPMADDWD per block; int8: |x| (broadcast too) times w sign(x),
 * VPMADDWD per group. Per block the int32 sums are converted once and scaled by the rows' scales
 * (8 contiguous fp16) x the activation's scale (one multiply), and for int4 the zero point (QF_Q4:
 * -8 d; QF_Q4Z: m) times the activation block's d * sum(q). Each output sums its blocks in k
 * order in one float lane whatever the tile and the batch: batch invariant, and a decode row is
 * the same code with one activation row (nothing prepared, nothing transposed). */

#define QG_BC(i, g) _mm256_set1_epi32(*(const int32_t *)(A->q + (m0 + i) * K + b * QK + 4 * (g)))
#define QG_BCA(i, g) _mm256_set1_epi32(*(const int32_t *)(A->a + (m0 + i) * K + b * QK + 4 * (g)))

#if QG_VNNI
#define QG_G4(i, g, wv) if (mr > i) a##i = _mm256_dpbusd_epi32(a##i, wv, QG_BC(i, g));
#define QG_G8(i, g) if (mr > i) a##i = _mm256_dpbusd_epi32(a##i, QG_BCA(i, g), _mm256_sign_epi8(wv, QG_BC(i, g)));
#else
#define QG_G4(i, g, wv) if (mr > i) a##i = _mm256_add_epi16(a##i, _mm256_maddubs_epi16(wv, QG_BC(i, g)));
#define QG_G8(i, g)                                                                                         \
    if (mr > i) a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(_mm256_maddubs_epi16(QG_BCA(i, g), _mm256_sign_epi8(wv, QG_BC(i, g))), ones));
#endif

/* int4: groups g and g + 4 from one 32-byte load */
#define QG_GROUP4(g)                                                                                       \
    {                                                                                                      \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + (g) * 32));                             \
        const __m256i wl = _mm256_and_si256(v, lo), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);     \
        QG_G4(0, g, wl) QG_G4(1, g, wl) QG_G4(2, g, wl) QG_G4(3, g, wl)                                    \
        QG_G4(0, (g) + 4, wh) QG_G4(1, (g) + 4, wh) QG_G4(2, (g) + 4, wh) QG_G4(3, (g) + 4, wh)            \
    }
#define QG_GROUP8(g)                                                                                       \
    {                                                                                                      \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wp + (g) * 32));                            \
        QG_G8(0, g) QG_G8(1, g) QG_G8(2, g) QG_G8(3, g)                                                    \
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

#define QG_STORE(i) if (mr > i) _mm256_storeu_ps(y + i * ldy, f##i);

/* rows [m0, m0 + mr) of A times W's rows [8 G, 8 G + 8): y[i * ldy + c] */
static inline __attribute__((always_inline)) void QG_NAME(tile8)(const int fmt, const int mr, const qact_t *A,
                                                                  int64_t m0, const qmat_t *W, int64_t G,
                                                                  float *y, int64_t ldy) {
    const int64_t K = W->K, nb = K / QK;
    const int q4 = fmt >= QF_Q4;
    const uint8_t *wg = W->q + G * QGROUP * qrow_bytes(fmt, K);
    const uint16_t *dg = W->d + G * QGROUP * (fmt == QF_Q8C ? 1 : nb);
    const uint16_t *mg = fmt == QF_Q4Z ? W->m + G * QGROUP * nb : NULL;
    const __m256i lo = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones; /* unused by the VNNI level */
    const __m256 sc_channel = fmt == QF_Q8C ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dg)) : _mm256_setzero_ps();
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wp = wg + b * QGROUP * (q4 ? QK / 2 : QK);
        /* the stream QPF bytes ahead (across 4 KiB pages, where the hardware prefetchers stop) */
        _mm_prefetch((const char *)(wp + QPF), _MM_HINT_T0);
        _mm_prefetch((const char *)(wp + QPF + 64), _MM_HINT_T0);
        if (!q4) {
            _mm_prefetch((const char *)(wp + QPF + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(wp + QPF + 192), _MM_HINT_T0);
        }
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        if (q4) {
            QG_GROUP4(0) QG_GROUP4(1) QG_GROUP4(2) QG_GROUP4(3)
        } else {
            QG_GROUP8(0) QG_GROUP8(1) QG_GROUP8(2) QG_GROUP8(3) QG_GROUP8(4) QG_GROUP8(5) QG_GROUP8(6) QG_GROUP8(7)
        }
        const __m256 sc = fmt == QF_Q8C ? sc_channel : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + b * QGROUP)));
        const __m256 mn = fmt == QF_Q4 ? _mm256_mul_ps(sc, _mm256_set1_ps(-8.f))
                          : fmt == QF_Q4Z ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mg + b * QGROUP)))
                                          : _mm256_setzero_ps();
        QG_SCALE(0) QG_SCALE(1) QG_SCALE(2) QG_SCALE(3)
    }
    QG_STORE(0) QG_STORE(1) QG_STORE(2) QG_STORE(3)
}

#define QG_MR(F)                                                                    \
    switch (mr) {                                                                   \
    case 1: QG_NAME(tile8)(F, 1, A, m0, W, G, y, ldy); break;                       \
    case 2: QG_NAME(tile8)(F, 2, A, m0, W, G, y, ldy); break;                       \
    case 3: QG_NAME(tile8)(F, 3, A, m0, W, G, y, ldy); break;                       \
    default: QG_NAME(tile8)(F, 4, A, m0, W, G, y, ldy); break;                      \
    }

static void QG_NAME(qgemm_tile)(const qact_t *A, int64_t m0, int mr, const qmat_t *W, int64_t G, float *y,
                                int64_t ldy) {
    switch (W->fmt) {
    case QF_Q8: QG_MR(QF_Q8) break;
    case QF_Q8C: QG_MR(QF_Q8C) break;
    case QF_Q4: QG_MR(QF_Q4) break;
    default: QG_MR(QF_Q4Z) break;
    }
}

#undef QG_BC
#undef QG_BCA
#undef QG_G4
#undef QG_G8
#undef QG_GROUP4
#undef QG_GROUP8
#undef QG_SUM
#undef QG_SCALE
#undef QG_STORE
#undef QG_MR
