/* Quantized weight formats for the CPU kernels (int8 / int4, llama.cpp Q8_0 / Q4_0 / Q4_1-like)
 * and the shared dot-product kernel (linear_quant_cpu.c defines it once per instruction-set
 * level and dispatches at run time; moe_quant_cpu.c calls it too).
 *
 * A quantized weight W [N, K] (K a multiple of 32) is kept row-major, one row a contiguous
 * stream of its K / 32 blocks:
 *   QF_Q8   int8 q [N, K],   fp16 scales d [N, K/32]:      w = d * q           (q in [-127, 127])
 *   QF_Q8C  int8 q [N, K],   fp16 scales d [N, 1]:         w = d[n] * q        (per output channel)
 *   QF_Q4   nibbles [N, K/2], fp16 d [N, K/32]:            w = d * (q - 8)     (q in [0, 15], symmetric)
 *   QF_Q4Z  nibbles [N, K/2], fp16 d, m [N, K/32]:         w = d * q + m       (q in [0, 15], zero point)
 * Nibbles of a block: byte i holds element i (low nibble) and element i + 16 (high nibble).
 * Activations are quantized on the fly per row, in blocks of 32 (int8 and its magnitude, float32
 * scale per block, and the block's scaled sum for QF_Q4Z). Each block's int32 dot product (exact)
 * lands in lane b % 8 of an 8-lane float32 accumulator, scaled by the two scales; the lanes are
 * summed at the end in a fixed order: results do not depend on the batch.
 */
#ifndef MOE_SERVE_QUANT_GEMM_H
#define MOE_SERVE_QUANT_GEMM_H
#include <stdint.h>

#define QK 32 /* block (group) size along K */

enum { QF_Q8 = 0, QF_Q8C = 1, QF_Q4 = 2, QF_Q4Z = 3 };
/* instruction-set levels of the quantized kernels, lowest first (0: the best this CPU runs) */
enum { ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512VNNI = 3 };

typedef struct {
    int fmt;
    int64_t N, K;
    const uint8_t *q;  /* [N, K] int8 or [N, K/2] nibbles */
    const uint16_t *d; /* fp16 scales [N, K/32] ([N, 1] for QF_Q8C) */
    const uint16_t *m; /* fp16 minimums [N, K/32] (QF_Q4Z), else NULL */
} qmat_t;

typedef struct {
    int8_t *q; /* [M, K] */
    int8_t *a; /* [M, K] |q| (the unsigned operand of the dot products) */
    float *d;  /* [M, K/32] scales */
    float *s;  /* [M, K/32] d * sum(q) of each block */
    int64_t K;
} qact_t;

static inline int64_t qrow_bytes(int fmt, int64_t K) { return fmt >= QF_Q4 ? K / 2 : K; }

#define QTILE_N 16 /* weight rows per prepared panel (the unit of work along N) */
#define QTILE_M 4  /* activation rows per micro-kernel call */
#define QPW 8      /* weight rows per micro-kernel call (half a panel: one 256-bit lane each) */

/* Up to QTILE_N weight rows prepared for the micro-kernel (quant_gemm_body.h), once per panel and
 * reused by every row of the batch: for block b and group g of 4 along k, the 16 rows' 4 weights
 * side by side, w[((b * 8 + g) * 16 + c) * 4 + j] = W[r0 + c, 32 b + 4 g + j] (int8 as is; int4
 * as 0..15), and per block the 16 rows' float scales (sc) and
 * zero-point terms (mn: -8 d for QF_Q4, m for QF_Q4Z). Rows past nr are zeros. */
typedef struct {
    int fmt, nr;
    int64_t K;
    int8_t *w, *a; /* w: [K/32][8][16][4]; a: unused (room kept in the scratch) */
    float *sc, *mn; /* [K/32][16] */
} qpanel_t;

/* bytes of the scratch one qpanel_t of K needs (qpanel_prepare's buf) */
static inline int64_t qpanel_bytes(int64_t K) { return 2 * QTILE_N * K + 2 * (K / QK) * QTILE_N * (int64_t)sizeof(float); }
/* rows [r0, r0 + nr) of W (nr <= QTILE_N) into P, in buf (qpanel_bytes(K)) */
void qpanel_prepare(const qmat_t *W, int64_t r0, int nr, void *buf, qpanel_t *P);
/* Activation rows up to QROW_MAX per call take qgemm_row, which reads W's rows as they are: the
 * same results, bit for bit, as qgemm_tile on the prepared panel (decode batches skip preparing). */
#ifndef QROW_MAX
#define QROW_MAX 2
#endif
/* Row m of A times rows [r0, r0 + nr) of W (nr <= QTILE_N): y[c]. */
void qgemm_row(const qact_t *A, int64_t m, const qmat_t *W, int64_t r0, int nr, float *y);
/* Rows [m0, m0 + mr) of A (mr <= QTILE_M) times the panel's rows: y[i * ldy + c] = A[m0 + i] . W[r0 + c],
 * c < P->nr. Runs the level chosen by quant_isa_set (linear_quant_cpu.c). */
void qgemm_tile(const qact_t *A, int64_t m0, int mr, const qpanel_t *P, float *y, int64_t ldy);
/* Quantize rows x [M, K] (rows ldx apart) into A's rows [a0, a0 + M) (blocks of 32). */
void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, qact_t *A, int64_t a0);
/* A with room for M rows of K (one allocation; free(A->q)); 0 when out of memory */
int qact_alloc(qact_t *A, int64_t M, int64_t K);
void qact_free(qact_t *A);

#endif
