/*
 * ops.h - the CPU reference ops of the forward pass, fp32 activations.
 *
 * Weights arrive as `mat`: a row-major [rows][cols] matrix in BF16 or F32
 * (the dtypes the loader keeps; F16 and FP8 are converted at load). All
 * arithmetic accumulates in fp32 or better. Ops that are worth it run on the
 * pool; the others work on one row and are called from pool jobs.
 */
#ifndef TD_CPU_OPS_H
#define TD_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/pool.h"

typedef struct {
    const void *data;   /* [rows][cols], BF16 or F32 */
    td_dtype dt;
    int64_t rows, cols;
} mat;

/* One row of a mat converted to fp32. */
void mat_row_f32(const mat *m, int64_t r, float *out);

/* y[t][0..W->rows) = x[t][0..W->cols) . W^T (+ bias), for t < T.
 * ldx / ldy are row strides in floats. Parallel over the rows of W, so each
 * weight row is read once for all T tokens. */
void op_matmul(pool *p, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const mat *W,
               const float *bias);

/* RMSNorm of one row: y = x / sqrt(mean(x^2) + eps) * w (w may be NULL). y may alias x. */
void op_rmsnorm(float *y, const float *x, const float *w, int n, float eps);
/* RMSNorm of T rows of length n with row strides ld (in place allowed), on the pool. */
void op_rmsnorm_rows(pool *p, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const float *w, int n,
                     float eps);

/* g[i] = silu(g[i]) * u[i] */
void op_silu_mul(float *g, const float *u, int64_t n);
/* in-place softmax of x[0..n) (max-subtracted, fp32) */
void op_softmax(float *x, int n);

/* Rotary embedding of one head vector x[0..dim) with precomputed cos/sin of
 * its position ([dim/2] each). pairs = 0: dims (i, i + dim/2) (rotate_half);
 * pairs = 1: dims (2i, 2i + 1) (interleaved). */
void op_rope(float *x, int dim, int pairs, const float *cos, const float *sin);

/* Kernel table for the matmul row kernels, chosen by ISA (tests use it to
 * compare every variant against the reference). */
typedef void (*mm_rows_fn)(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W,
                           int64_t K, int64_t n0, int64_t n1);
typedef struct {
    mm_rows_fn bf16, f32;
} mm_kernels;
const mm_kernels *mm_kernels_for(int isa); /* falls back to the best lower ISA */

#endif
