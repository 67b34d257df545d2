/*
 * ops.h - the CPU reference ops of the forward pass, fp32 activations.
 *
 * Weights arrive as `mat`: a row-major [rows][cols] matrix in BF16 or F32
 * (a CPU-only engine converts F16 and FP8 matrices once after load). All
 * arithmetic accumulates in fp32 or better. Ops that are worth it run on the
 * pool; the others work on one row and are called from pool jobs.
 */
#ifndef TD_CPU_OPS_H
#define TD_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/pool.h"

/* Routed experts stored as compressed-tensors pack-quantized INT4 (symmetric,
 * group 32) are views with dt = DT_I32: data is the checkpoint's weight_packed,
 * [rows][ceil(cols / 8)] int32, column c at bits 4 * (c % 8) of word c / 8 as
 * u = q + 8 (q in [-8, 7]), and scale_bf16 its weight_scale; the value is
 * q * scale (moe.h's MOE_SRC_I4SYM is the same layout). */
#define MAT_I4_GROUP 32

typedef struct {
    const void *data;   /* [rows][cols], BF16 or F32: what op_matmul reads. Until the engine knows who reads a
                           matrix (runtime/load.c), it may also be an F16 or F8_E4M3 view of the checkpoint
                           (routed experts also I32, packed INT4 as above), or NULL: dummy weights, generated
                           from `seed` whenever they are read; mat_row_range_f32 reads every kind */
    td_dtype dt;
    int64_t rows, cols;
    const float *scale; /* F8_E4M3: [ceil(rows / bn)][ceil(cols / bk)] fp32 block scales */
    int bn, bk;
    const uint16_t *scale_bf16; /* I32 (packed INT4): [rows][ceil(cols / 32)] bf16 group scales */
    uint64_t seed;      /* data == NULL: the dummy weights' seed (mat_dummy_row) */
    float amp;          /* data == NULL: their amplitude; 0 = mat_dummy_amp(cols) */
    int gguf_type;      /* > 0: a GGUF tensor's rows (runtime/load_gguf.c), 1 + its ggml type (io/gguf.h): rows of
                           gguf_row_bytes(type, cols) bytes, read through mat_row_range_f32 (dt is then unused) */
} mat;

/* Dummy weights: row r of a matrix seeded by seed, columns [c0, c0 + n):
 * uniform in [-amp, amp) rounded to bf16, from a counter-based generator (any
 * column range of any row can be made alone, in any order, with the same
 * values). bf and f (either may be NULL) get the bf16 bits / their value. */
void mat_dummy_row(uint64_t seed, int64_t r, int64_t c0, int64_t n, float amp, uint16_t *bf, float *f);
/* the amplitude dummy matrices of `cols` inputs get: variance 1/cols */
float mat_dummy_amp(int64_t cols);

/* Bytes of a view's data and of its scales as the checkpoint stores them
 * (packed INT4: half a byte per weight; 0 for dummy weights). */
size_t mat_data_bytes(const mat *m);
size_t mat_scale_bytes(const mat *m);

/* One row of a mat converted to fp32. */
void mat_row_f32(const mat *m, int64_t r, float *out);
/* Columns [c0, c0 + n) of row r, fp32, for every kind of mat above (F16,
 * FP8 and packed INT4 exactly: q * scale in fp32). */
void mat_row_range_f32(const mat *m, int64_t r, int64_t c0, int64_t n, float *out);

/* y[t][0..W->rows) = x[t][0..W->cols) . W^T (+ bias), for t < T.
 * ldx / ldy are row strides in floats. Parallel over the rows of W, so each
 * weight row is read once for all T tokens.
 * Batch invariance: on every kernel set but AMX a token's row of y does not
 * depend on T or on the other rows of x (one fixed sum order per row). On
 * AMX, BF16 weights with MM_AMX_MIN_T or more tokens run on tiles (mm_amx.c,
 * within ~1e-6 of fp32), whose sums differ in order from the vector kernels':
 * there a token's logits depend on the batch it runs in, by rounding. */
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
