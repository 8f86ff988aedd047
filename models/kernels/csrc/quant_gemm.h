/* Quantized weight formats for the CPU kernels (int8 / int4, llama.cpp Q8_0 / Q4_0 / Q4_1-like)
 * and the shared dot-product kernel (linear_quant_cpu.c defines it once per instruction-set
 * level and dispatches at run time; moe_quant_cpu.c calls it too).
 *
 * A quantized weight W [N, K] (K a multiple of 32, N of 8) has the shapes of its row-major form
 *   QF_Q8   int8 q [N, K],   fp16 scales d [N, K/32]:      w = d * q           (q in [-127, 127])
 *   QF_Q8C  int8 q [N, K],   fp16 scales d [N, 1]:         w = d[n] * q        (per output channel)
 *   QF_Q4   nibbles [N, K/2], fp16 d [N, K/32]:            w = d * (q - 8)     (q in [0, 15], symmetric)
 *   QF_Q4Z  nibbles [N, K/2], fp16 d, m [N, K/32]:         w = d * q + m       (q in [0, 15], zero point)
 * but is stored in the kernel order, packed once when it is written (models/kernels/quant.py
 * `to_kernel_order`): each group of 8 rows (QGROUP) is one run of its K/32 blocks, and a block of
 * the group is, for each group g of 4 along k, the 8 rows' 4 weights side by side (32 bytes):
 *   int8: byte 32 g + 4 c + j of the block (g < 8) = W[8 G + c, 32 b + 4 g + j]   (256 bytes)
 *   int4: byte 32 g + 4 c + j of the block (g < 4) = W[.., 32 b + 4 g + j] | W[.., 32 b + 4 (g + 4) + j] << 4
 *                                                                                  (128 bytes)
 * and its 8 rows' scales (and minimums) side by side: d[8 G * K/32 + 8 b + c] (QF_Q8C: d[8 G + c],
 * the row-major order). A tile of activation rows reads a group as it is stored: a 32-byte load
 * is 8 rows' 4 weights (int4: two such groups, its nibbles), against one broadcast of 4
 * activations; the 8 rows' sums land in the 8 lanes.
 * Activations are quantized on the fly per row, in blocks of 32 (int8 and its magnitude, float32
 * scale per block, and the block's scaled sum for QF_Q4Z). Each block's int32 dot product (exact)
 * is scaled by the two scales and added to its output's float32 lane in k order: results do not
 * depend on the batch.
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

#define QGROUP 8   /* weight rows stored together (the kernel order) and per micro-kernel call */
#define QTILE_N 16 /* weight rows per work item (two groups) */
#define QTILE_M 4  /* activation rows per micro-kernel call */
#define QPF 2048   /* bytes of a weight stream prefetched ahead (the kernel order is one stream per thread) */

/* Rows [m0, m0 + mr) of A (mr <= QTILE_M) times W's rows [8 G, 8 G + 8): y[i * ldy + c] =
 * A[m0 + i] . W[8 G + c]. Runs the level chosen by quant_isa_set (linear_quant_cpu.c). */
void qgemm_tile(const qact_t *A, int64_t m0, int mr, const qmat_t *W, int64_t G, float *y, int64_t ldy);
/* Quantize rows x [M, K] (rows ldx apart) into A's rows [a0, a0 + M) (blocks of 32). */
void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, qact_t *A, int64_t a0);
/* A with room for M rows of K (one allocation; free(A->q)); 0 when out of memory */
int qact_alloc(qact_t *A, int64_t M, int64_t K);
void qact_free(qact_t *A);

#endif
