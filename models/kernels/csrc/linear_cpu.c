/* Linear layers on the CPU for decode-sized batches (float32, AVX2 + FMA).
 *
 * y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W packed as panels [N/16, K, 16] (panel_gemm.h):
 * each panel is streamed once per call while the batch's rows (at most a few dozen in a
 * decode step) are applied to it. oneDNN's GEMM, built for larger M, reads the weight at a
 * fraction of the memory bandwidth at these sizes (docs/benchmarks.md, "CPU kernels").
 * Built by models/kernels/cpu_build.py, called as torch.ops.moe_serve.linear_cpu (csrc/ops.cpp; GIL released); each thread takes
 * a contiguous range of panels (`run_jobs`, panel_gemm.h).
 */
#include <stdint.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "panel_gemm.h"

typedef struct {
    const float *x, *Wp, *bias;
    float *y;
    int64_t M, N, K, ldx, j0, j1;
} lin_job_t;

static void *lin_range(void *arg) {
    const lin_job_t *J = (const lin_job_t *)arg;
    const int64_t K = J->K, N = J->N;
    for (int64_t j = J->j0; j < J->j1; j++) {
        const float *P = J->Wp + j * K * NR;
        for (int64_t m = 0; m < J->M; m += MR) {
            const int mr = (int)(J->M - m < MR ? J->M - m : MR);
            float *yb = J->y + m * N + j * NR;
            micro_any(mr, J->x + m * J->ldx, J->ldx, P, K, yb, N);
            if (J->bias)
                for (int i = 0; i < mr; i++)
                    for (int c = 0; c < NR; c++) yb[i * N + c] += J->bias[j * NR + c];
        }
    }
    return NULL;
}

/* Returns 0 on success, 3 for bad shapes. x rows are `ldx` floats apart; y is [M, N] contiguous. */
int linear_f32(const float *x, const float *Wp, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
               int64_t ldx, int nthreads) {
    if (N % NR || M < 0 || K < 1) return 3;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    const int64_t panels = N / NR;
    if (nthreads > panels) nthreads = (int)(panels > 0 ? panels : 1);
    lin_job_t jobs[MAX_THREADS];
    for (int t = 0; t < nthreads; t++)
        jobs[t] = (lin_job_t){x, Wp, bias, y, M, N, K, ldx, panels * t / nthreads, panels * (t + 1) / nthreads};
    run_jobs(lin_range, jobs, sizeof jobs[0], nthreads);
    return 0;
}

/* W [N, K] -> panels [N/16, K, 16]; N a multiple of 16. */
void linear_pack_f32(const float *W, float *Wp, int64_t N, int64_t K) { pack_panels(W, K, N, K, Wp); }

#else /* no AVX2 + FMA: the callers keep the PyTorch path */
int linear_f32(const float *x, const float *Wp, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
               int64_t ldx, int nthreads) { return 4; }
void linear_pack_f32(const float *W, float *Wp, int64_t N, int64_t K) {}
#endif
