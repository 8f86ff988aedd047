/* One instruction-set level of the fp8 (e4m3fn) weight kernels, included by fp8_cpu.c once per
 * level (the AVX-512 one inside a `#pragma GCC target` region), with:
 *   F8N(x)     the level's name for x;        F8_WIDE  0: 256-bit vectors (AVX2), 1: 512-bit (AVX-512)
 *   F8_MR      activation rows per tile (4 with 16 ymm registers, 8 with 32 zmm ones).
 * A step converts F8_STEP weights of a row (2 vectors) and applies them to up to F8_MR rows of x. */

#if F8_WIDE
typedef __m512 F8N(vf);
#define F8_LANES 16
#define F8_ZERO() _mm512_setzero_ps()
#define F8_SET1(v) _mm512_set1_ps(v)
#define F8_LOAD(p) _mm512_loadu_ps(p)
#define F8_STORE(p, v) _mm512_storeu_ps(p, v)
#define F8_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define F8_ADD(a, b) _mm512_add_ps(a, b)
#define F8_HSUM(v) _mm512_reduce_add_ps(v)
#define F8_MASKT __mmask16
#define F8_MLOAD(p, m) _mm512_maskz_loadu_ps(m, p)

/* lanes below n of the two vectors of a step (n < 32) */
static inline __attribute__((always_inline)) void F8N(masks)(int n, __mmask16 *lo, __mmask16 *hi) {
    *lo = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    *hi = n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : (__mmask16)0;
}

/* 32 e4m3fn bytes -> float32 / 256 (exact), see fp8_cpu.c */
static inline __attribute__((always_inline)) void F8N(cvt)(const uint8_t *p, __m512 *lo, __m512 *hi) {
    __m512i h = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    h = _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(h, 8), 1), _mm512_set1_epi16((short)0xBF80));
    const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, _mm512_set1_epi16(0x7FFF)),
                                                  _mm512_set1_epi16(0x3F80));
    h = _mm512_mask_mov_epi16(h, nan, _mm512_or_si512(h, _mm512_set1_epi16(0x7C00)));
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
#else
typedef __m256 F8N(vf);
#define F8_LANES 8
#define F8_ZERO() _mm256_setzero_ps()
#define F8_SET1(v) _mm256_set1_ps(v)
#define F8_LOAD(p) _mm256_loadu_ps(p)
#define F8_STORE(p, v) _mm256_storeu_ps(p, v)
#define F8_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define F8_ADD(a, b) _mm256_add_ps(a, b)
#define F8_HSUM(v) f8_hsum8(v)
#define F8_MASKT __m256i
#define F8_MLOAD(p, m) _mm256_maskload_ps(p, m)

/* lanes below n of the two vectors of a step (n < 16) */
static inline __attribute__((always_inline)) void F8N(masks)(int n, __m256i *lo, __m256i *hi) {
    const __m256i nv = _mm256_set1_epi32(n), iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    *lo = _mm256_cmpgt_epi32(nv, iota);
    *hi = _mm256_cmpgt_epi32(nv, _mm256_add_epi32(iota, _mm256_set1_epi32(8)));
}

/* 16 e4m3fn bytes -> float32 / 256 (exact), see fp8_cpu.c */
static inline __attribute__((always_inline)) void F8N(cvt)(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m256i h = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(h, 8), 1), _mm256_set1_epi16((short)0xBF80));
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)), _mm256_set1_epi16(0x3F80));
    h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7C00)));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
#endif
#define F8_STEP (2 * F8_LANES)

/* row r of W as float32 / 256 into dst[0:K] (exact: the values the converting tile computes with) */
static void F8N(convert_row)(const f8mat_t *W, int64_t r, float *dst) {
    const uint8_t *row = W->q + r * W->K;
    int64_t kk = 0;
    for (; kk + F8_STEP <= W->K; kk += F8_STEP) {
        F8N(vf) lo, hi;
        F8N(cvt)(row + kk, &lo, &hi);
        F8_STORE(dst + kk, lo);
        F8_STORE(dst + kk + F8_LANES, hi);
    }
    for (; kk < W->K; kk++) dst[kk] = f8_value(row[kk]) * (1.f / 256.f);
}

#define F8_ROW(i)                                                                         \
    if (mr > i) {                                                                         \
        a##i = F8_FMA(wl, F8_LOAD(x + i * ldx + kk), a##i);                               \
        b##i = F8_FMA(wh, F8_LOAD(x + i * ldx + kk + F8_LANES), b##i);                    \
    }
#define F8_TAIL(i)                                                                        \
    if (mr > i) {                                                                         \
        a##i = F8_FMA(wl, F8_MLOAD(x + i * ldx + kk, ml), a##i);                          \
        b##i = F8_FMA(wh, F8_MLOAD(x + i * ldx + kk + F8_LANES, mh), b##i);               \
    }
#define F8_BLOCK_END(i) \
    if (mr > i) t##i = F8_FMA(sv, F8_ADD(a##i, b##i), t##i);
#define F8_OUT(i) \
    if (mr > i) y[i * ldy + c] = F8_HSUM(t##i);
#define F8_DECL(i) F8N(vf) a##i = F8_ZERO(), b##i = a##i;

/* tile(1, ...) over rows r and r + 1 of W at once: y[0], y[1]. Each row's sums are the same
 * operations in the same order as tile's (bitwise the same results); the two rows' four
 * accumulator chains hide the FMA latency that one row's two would expose (decode: one row of x). */
static inline __attribute__((always_inline)) void F8N(pair1)(const float *x, const f8mat_t *W, const float *fw,
                                                              int64_t r, float *y) {
    const int64_t K = W->K, bk = W->bk;
    const uint8_t *row0 = W->q + r * K, *row1 = row0 + K;
    const float *f0 = fw, *f1 = fw ? fw + K : NULL;
    const float *s0 = W->s + (r / W->bn) * W->skb, *s1 = W->s + ((r + 1) / W->bn) * W->skb;
    F8N(vf) t0 = F8_ZERO(), t1 = t0;
    for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, kb++) {
        const int64_t k1 = k0 + bk < K ? k0 + bk : K;
        F8N(vf) a0 = F8_ZERO(), b0 = a0, a1 = a0, b1 = a0;
        int64_t kk = k0;
        for (; kk + F8_STEP <= k1; kk += F8_STEP) {
            F8N(vf) w0l, w0h, w1l, w1h;
            if (fw) {
                w0l = F8_LOAD(f0 + kk), w0h = F8_LOAD(f0 + kk + F8_LANES);
                w1l = F8_LOAD(f1 + kk), w1h = F8_LOAD(f1 + kk + F8_LANES);
            } else {
                _mm_prefetch((const char *)(row0 + kk + 1024), _MM_HINT_T0);
                _mm_prefetch((const char *)(row1 + kk + 1024), _MM_HINT_T0);
                F8N(cvt)(row0 + kk, &w0l, &w0h);
                F8N(cvt)(row1 + kk, &w1l, &w1h);
            }
            const F8N(vf) xl = F8_LOAD(x + kk), xh = F8_LOAD(x + kk + F8_LANES);
            a0 = F8_FMA(w0l, xl, a0), b0 = F8_FMA(w0h, xh, b0);
            a1 = F8_FMA(w1l, xl, a1), b1 = F8_FMA(w1h, xh, b1);
        }
        if (kk < k1) {
            const int n = (int)(k1 - kk);
            F8_MASKT ml, mh;
            F8N(masks)(n, &ml, &mh);
            F8N(vf) w0l, w0h, w1l, w1h;
            if (fw) {
                w0l = F8_MLOAD(f0 + kk, ml), w0h = F8_MLOAD(f0 + kk + F8_LANES, mh);
                w1l = F8_MLOAD(f1 + kk, ml), w1h = F8_MLOAD(f1 + kk + F8_LANES, mh);
            } else {
                float wb0[F8_STEP], wb1[F8_STEP];
                for (int j = 0; j < F8_STEP; j++) {
                    wb0[j] = j < n ? f8_value(row0[kk + j]) * (1.f / 256.f) : 0.f;
                    wb1[j] = j < n ? f8_value(row1[kk + j]) * (1.f / 256.f) : 0.f;
                }
                w0l = F8_LOAD(wb0), w0h = F8_LOAD(wb0 + F8_LANES), w1l = F8_LOAD(wb1), w1h = F8_LOAD(wb1 + F8_LANES);
            }
            const F8N(vf) xl = F8_MLOAD(x + kk, ml), xh = F8_MLOAD(x + kk + F8_LANES, mh);
            a0 = F8_FMA(w0l, xl, a0), b0 = F8_FMA(w0h, xh, b0);
            a1 = F8_FMA(w1l, xl, a1), b1 = F8_FMA(w1h, xh, b1);
        }
        t0 = F8_FMA(F8_SET1(s0[kb] * 256.f), F8_ADD(a0, b0), t0);
        t1 = F8_FMA(F8_SET1(s1[kb] * 256.f), F8_ADD(a1, b1), t1);
    }
    y[0] = F8_HSUM(t0);
    y[1] = F8_HSUM(t1);
}

/* y[i * ldy + c] = x[i] . dequant(W)[r0 + c] for i < mr, c < nr. `fw` NULL: W's bytes are converted
 * here; else fw holds rows r0.. converted (convert_row, K floats each): the same values, the same
 * sums in the same order (a row's result does not depend on mr, nor on which source). Each block
 * of bk inputs sums its products unscaled, then adds them times its scale (times 256) to the row's
 * total; a block's last inputs short of a step are one more step over masked loads (zeros past them):
 * vector FMAs only, no scalar sum the compiler could reassociate differently per instantiation. */
static inline __attribute__((always_inline)) void F8N(tile)(const int mr, const float *x, int64_t ldx,
                                                             const f8mat_t *W, const float *fw, int64_t r0, int nr,
                                                             float *y, int64_t ldy) {
    const int64_t K = W->K, bk = W->bk;
    for (int c = 0; c < nr; c++) {
        const int64_t r = r0 + c;
        if (mr == 1 && c + 1 < nr) { /* one row of x: two rows of W at a time */
            F8N(pair1)(x, W, fw ? fw + (int64_t)c * K : NULL, r, y + c);
            c++;
            continue;
        }
        const uint8_t *row = W->q + r * K;
        const float *frow = fw ? fw + (int64_t)c * K : NULL;
        const float *srow = W->s + (r / W->bn) * W->skb;
        F8N(vf) t0 = F8_ZERO(), t1 = t0, t2 = t0, t3 = t0;
#if F8_MR > 4
        F8N(vf) t4 = t0, t5 = t0, t6 = t0, t7 = t0;
#endif
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += bk, kb++) {
            const int64_t k1 = k0 + bk < K ? k0 + bk : K;
            F8_DECL(0) F8_DECL(1) F8_DECL(2) F8_DECL(3)
#if F8_MR > 4
            F8_DECL(4) F8_DECL(5) F8_DECL(6) F8_DECL(7)
#endif
            int64_t kk = k0;
            for (; kk + F8_STEP <= k1; kk += F8_STEP) {
                F8N(vf) wl, wh;
                if (frow) {
                    wl = F8_LOAD(frow + kk);
                    wh = F8_LOAD(frow + kk + F8_LANES);
                } else {
                    _mm_prefetch((const char *)(row + kk + 1024), _MM_HINT_T0);
                    F8N(cvt)(row + kk, &wl, &wh);
                }
                F8_ROW(0) F8_ROW(1) F8_ROW(2) F8_ROW(3)
#if F8_MR > 4
                F8_ROW(4) F8_ROW(5) F8_ROW(6) F8_ROW(7)
#endif
            }
            if (kk < k1) { /* the block's last inputs (K or bk not a multiple of the step): masked */
                const int n = (int)(k1 - kk);
                F8_MASKT ml, mh;
                F8N(masks)(n, &ml, &mh);
                F8N(vf) wl, wh;
                if (frow) {
                    wl = F8_MLOAD(frow + kk, ml);
                    wh = F8_MLOAD(frow + kk + F8_LANES, mh);
                } else {
                    float wb[F8_STEP];
                    for (int j = 0; j < F8_STEP; j++) wb[j] = j < n ? f8_value(row[kk + j]) * (1.f / 256.f) : 0.f;
                    wl = F8_LOAD(wb);
                    wh = F8_LOAD(wb + F8_LANES);
                }
                F8_TAIL(0) F8_TAIL(1) F8_TAIL(2) F8_TAIL(3)
#if F8_MR > 4
                F8_TAIL(4) F8_TAIL(5) F8_TAIL(6) F8_TAIL(7)
#endif
            }
            const float sc = srow[kb] * 256.f;
            const F8N(vf) sv = F8_SET1(sc);
            F8_BLOCK_END(0) F8_BLOCK_END(1) F8_BLOCK_END(2) F8_BLOCK_END(3)
#if F8_MR > 4
            F8_BLOCK_END(4) F8_BLOCK_END(5) F8_BLOCK_END(6) F8_BLOCK_END(7)
#endif
        }
        F8_OUT(0) F8_OUT(1) F8_OUT(2) F8_OUT(3)
#if F8_MR > 4
        F8_OUT(4) F8_OUT(5) F8_OUT(6) F8_OUT(7)
#endif
    }
}

static void F8N(tile_any)(int mr, const float *x, int64_t ldx, const f8mat_t *W, const float *fw, int64_t r0, int nr,
                          float *y, int64_t ldy) {
    switch (mr) {
    case 1: F8N(tile)(1, x, ldx, W, fw, r0, nr, y, ldy); break;
    case 2: F8N(tile)(2, x, ldx, W, fw, r0, nr, y, ldy); break;
    case 3: F8N(tile)(3, x, ldx, W, fw, r0, nr, y, ldy); break;
#if F8_MR > 4
    case 4: F8N(tile)(4, x, ldx, W, fw, r0, nr, y, ldy); break;
    case 5: F8N(tile)(5, x, ldx, W, fw, r0, nr, y, ldy); break;
    case 6: F8N(tile)(6, x, ldx, W, fw, r0, nr, y, ldy); break;
    case 7: F8N(tile)(7, x, ldx, W, fw, r0, nr, y, ldy); break;
    default: F8N(tile)(8, x, ldx, W, fw, r0, nr, y, ldy); break;
#else
    default: F8N(tile)(4, x, ldx, W, fw, r0, nr, y, ldy); break;
#endif
    }
}

#undef F8_LANES
#undef F8_ZERO
#undef F8_SET1
#undef F8_LOAD
#undef F8_STORE
#undef F8_FMA
#undef F8_ADD
#undef F8_HSUM
#undef F8_MASKT
#undef F8_MLOAD
#undef F8_STEP
#undef F8_ROW
#undef F8_TAIL
#undef F8_BLOCK_END
#undef F8_OUT
#undef F8_DECL
