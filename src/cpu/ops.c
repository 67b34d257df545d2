/*
 * ops.c - reference CPU ops (norms, activations, rope) and the dense matmul
 * driver that hands row ranges of a weight matrix to the pool.
 */
#include "cpu/ops.h"
#include "core/bf16.h"
#include "core/isa.h"
#include "cpu/mm_impl.h"
#include "io/gguf.h" /* GGUF views: block sizes and the reference dequantisation, pure functions */

#include <math.h>
#include <pthread.h>
#include <string.h>

/* splitmix64's output function; the generator's state after j steps is
 * seed + j * golden, so step j can be taken directly */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void mat_dummy_row(uint64_t seed, int64_t r, int64_t c0, int64_t n, float amp, uint16_t *bf, float *f)
{
    uint64_t st = seed ^ (uint64_t)r * 0x2545f4914f6cdd1dull;
    for (int64_t k = c0; k < c0 + n;) {
        int64_t j = k / 4; /* one 64-bit draw gives 4 columns */
        uint64_t v = mix64(st + (uint64_t)(j + 1) * 0x9e3779b97f4a7c15ull);
        for (int64_t c = k; c < 4 * j + 4 && c < c0 + n; c++, k++) {
            float u = (float)((v >> (16 * (c - 4 * j))) & 0xffff) / 32768.0f - 1.0f;
            uint16_t b = f32_to_bf16(u * amp);
            if (bf)
                bf[c - c0] = b;
            if (f)
                f[c - c0] = bf16_to_f32(b);
        }
    }
}

float mat_dummy_amp(int64_t cols) { return sqrtf(3.0f / (float)cols); }

/* the 256 E4M3 values: packing reads every FP8 weight once through here */
static float fp8_lut[256];
static pthread_once_t fp8_once = PTHREAD_ONCE_INIT;
static void fp8_lut_init(void)
{
    for (int q = 0; q < 256; q++)
        fp8_lut[q] = fp8e4m3_to_f32((uint8_t)q);
}

size_t mat_data_bytes(const mat *m)
{
    if (!m->data)
        return 0;
    if (m->gguf_type > 0)
        return (size_t)m->rows * gguf_row_bytes(m->gguf_type - 1, m->cols);
    if (m->dt == DT_I32) /* packed INT4: whole int32 words per row */
        return (size_t)m->rows * (size_t)((m->cols + 7) / 8) * 4;
    return (size_t)(m->rows * m->cols) * dtype_size(m->dt);
}

size_t mat_scale_bytes(const mat *m)
{
    if (m->dt == DT_I32 && m->scale_bf16)
        return (size_t)m->rows * (size_t)((m->cols + MAT_I4_GROUP - 1) / MAT_I4_GROUP) * 2;
    if (m->scale)
        return (size_t)((m->rows + m->bn - 1) / m->bn) * (size_t)((m->cols + m->bk - 1) / m->bk) * sizeof(float);
    return 0;
}

void mat_row_range_f32(const mat *m, int64_t r, int64_t c0, int64_t n, float *out)
{
    if (!m->data) {
        mat_dummy_row(m->seed, r, c0, n, m->amp > 0 ? m->amp : mat_dummy_amp(m->cols), NULL, out);
        return;
    }
    if (m->gguf_type > 0) { /* dequantise the blocks that overlap [c0, c0 + n) */
        const int type = m->gguf_type - 1, bs = gguf_type_block(type);
        const size_t bb = gguf_type_block_bytes(type);
        const unsigned char *row = (const unsigned char *)m->data + (size_t)r * gguf_row_bytes(type, m->cols);
        float tmp[256];
        for (int64_t b = c0 / bs; b * bs < c0 + n; b++) {
            gguf_dequant(type, row + (size_t)b * bb, tmp, bs);
            int64_t lo = b * bs > c0 ? b * bs : c0, hi = (b + 1) * bs < c0 + n ? (b + 1) * bs : c0 + n;
            memcpy(out + (lo - c0), tmp + (lo - b * bs), (size_t)(hi - lo) * sizeof(float));
        }
        return;
    }
    size_t at = (size_t)(r * m->cols + c0);
    switch (m->dt) {
    case DT_F32:
        memcpy(out, (const float *)m->data + at, (size_t)n * sizeof(float));
        break;
    case DT_F16:
        for (int64_t i = 0; i < n; i++)
            out[i] = f16_to_f32(((const uint16_t *)m->data)[at + (size_t)i]);
        break;
    case DT_F8_E4M3: {
        pthread_once(&fp8_once, fp8_lut_init);
        const float *srow = m->scale + (r / m->bn) * ((m->cols + m->bk - 1) / m->bk);
        const uint8_t *q = (const uint8_t *)m->data + at;
        for (int64_t i = 0; i < n;) {
            int64_t blk = (c0 + i) / m->bk, end = (blk + 1) * m->bk - c0;
            float sc = srow[blk];
            for (end = end < n ? end : n; i < end; i++)
                out[i] = fp8_lut[q[i]] * sc;
        }
        break;
    }
    case DT_I32: { /* packed INT4: q = u - 8, times the row's group scale (a 4-bit integer times a bf16: exact) */
        const int64_t words = (m->cols + 7) / 8, groups = (m->cols + MAT_I4_GROUP - 1) / MAT_I4_GROUP;
        const uint32_t *w = (const uint32_t *)m->data + r * words;
        const uint16_t *srow = m->scale_bf16 + r * groups;
        for (int64_t i = 0; i < n; i++) {
            int64_t c = c0 + i;
            int u = (int)((w[c / 8] >> (4 * (c % 8))) & 15u);
            out[i] = (float)(u - 8) * bf16_to_f32(srow[c / MAT_I4_GROUP]);
        }
        break;
    }
    default:
        for (int64_t i = 0; i < n; i++)
            out[i] = bf16_to_f32(((const uint16_t *)m->data)[at + (size_t)i]);
    }
}

void mat_row_f32(const mat *m, int64_t r, float *out) { mat_row_range_f32(m, r, 0, m->cols, out); }

/* ---- matmul ---------------------------------------------------------------- */

/* The scalar reference: one fp32 accumulator per output, in order of k. */
static void mm_rows_bf16_ref(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                             int64_t n0, int64_t n1)
{
    const uint16_t *w = W;
    for (int64_t n = n0; n < n1; n++)
        for (int t = 0; t < T; t++) {
            float acc = 0;
            for (int64_t k = 0; k < K; k++)
                acc += x[t * ldx + k] * bf16_to_f32(w[n * K + k]);
            y[t * ldy + n] = acc;
        }
}

static void mm_rows_f32_ref(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                            int64_t n0, int64_t n1)
{
    const float *w = W;
    for (int64_t n = n0; n < n1; n++)
        for (int t = 0; t < T; t++) {
            float acc = 0;
            for (int64_t k = 0; k < K; k++)
                acc += x[t * ldx + k] * w[n * K + k];
            y[t * ldy + n] = acc;
        }
}

static const mm_kernels mm_ref = { mm_rows_bf16_ref, mm_rows_f32_ref };
extern const mm_kernels mm_avx2, mm_avx512;

const mm_kernels *mm_kernels_for(int isa)
{
    if (isa >= ISA_AVX512)
        return &mm_avx512;
    if (isa >= ISA_AVX2)
        return &mm_avx2;
    return &mm_ref;
}

typedef struct {
    float *y;
    int64_t ldy, ldx;
    const float *x;
    int T;
    const mat *W;
    const float *bias;
    mm_rows_fn fn;
} mm_ctx;

enum { MM_ROWS = 16 }; /* rows of W per work item: 16 rows x K fit in L1/L2 */

static void mm_job(void *arg, int64_t b, int64_t e)
{
    const mm_ctx *c = arg;
    int64_t n0 = b * MM_ROWS, n1 = e * MM_ROWS < c->W->rows ? e * MM_ROWS : c->W->rows;
    c->fn(c->y, c->ldy, c->x, c->ldx, c->T, c->W->data, c->W->cols, n0, n1);
    if (c->bias)
        for (int t = 0; t < c->T; t++)
            for (int64_t n = n0; n < n1; n++)
                c->y[t * c->ldy + n] += c->bias[n];
}

/* AMX prefill: each item is a range of whole 32-row blocks (the last item
 * also the N % 32 rows left, on the AVX-512 kernel) over all T tokens. An
 * item converts all of x to tiles once, so items are few and large: about
 * two per thread, at least 64 rows. */
typedef struct {
    float *y;
    int64_t ldy, ldx, rows_per;
    const float *x;
    int T;
    const mat *W;
    const float *bias;
} mm_amx_ctx;

static void mm_amx_job(void *arg, int64_t b, int64_t e)
{
    const mm_amx_ctx *c = arg;
    const int64_t N = c->W->rows, K = c->W->cols;
    for (int64_t i = b; i < e; i++) {
        int64_t n0 = i * c->rows_per, n1 = n0 + c->rows_per < N ? n0 + c->rows_per : N;
        int64_t na = n0 + ((n1 - n0) & ~(int64_t)31);
        if (na > n0 && mm_amx_ready())
            mm_bf16_amx(c->y, c->ldy, c->x, c->ldx, c->T, c->W->data, K, n0, na);
        else
            na = n0; /* no buffer: the AVX-512 kernel takes the whole range */
        if (na < n1)
            mm_kernels_for(ISA_AVX512)->bf16(c->y, c->ldy, c->x, c->ldx, c->T, c->W->data, K, na, n1);
        if (c->bias)
            for (int t = 0; t < c->T; t++)
                for (int64_t n = n0; n < n1; n++)
                    c->y[t * c->ldy + n] += c->bias[n];
    }
}

void op_matmul(pool *p, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const mat *W, const float *bias)
{
    const int isa = isa_current();
    if (isa >= ISA_AMX && W->dt == DT_BF16 && T >= MM_AMX_MIN_T && W->rows >= 32 && mm_amx_takes(W->cols)) {
        int64_t per = (W->rows + 2 * pool_size(p) - 1) / (2 * pool_size(p));
        per = (per + 31) & ~(int64_t)31;
        per = per < 64 ? 64 : per;
        mm_amx_ctx c = { y, ldy, ldx, per, x, T, W, bias };
        pool_run(p, (W->rows + per - 1) / per, 1, mm_amx_job, &c);
        return;
    }
    const mm_kernels *k = mm_kernels_for(isa);
    mm_ctx c = { y, ldy, ldx, x, T, W, bias, W->dt == DT_F32 ? k->f32 : k->bf16 };
    int64_t items = (W->rows + MM_ROWS - 1) / MM_ROWS;
    pool_run(p, items, 1, mm_job, &c);
}

/* ---- row ops ---------------------------------------------------------------- */

void op_rmsnorm(float *y, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++)
        y[i] = w ? w[i] * (x[i] * r) : x[i] * r;
}

typedef struct {
    float *y;
    const float *x, *w;
    int64_t ldy, ldx;
    int n;
    float eps;
} norm_ctx;

static void norm_job(void *arg, int64_t b, int64_t e)
{
    const norm_ctx *c = arg;
    for (int64_t t = b; t < e; t++)
        op_rmsnorm(c->y + t * c->ldy, c->x + t * c->ldx, c->w, c->n, c->eps);
}

void op_rmsnorm_rows(pool *p, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const float *w, int n,
                     float eps)
{
    norm_ctx c = { y, x, w, ldy, ldx, n, eps };
    if (T * (int64_t)n < 65536)
        norm_job(&c, 0, T);
    else
        pool_run(p, T, 0, norm_job, &c);
}

void op_silu_mul(float *g, const float *u, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void op_softmax(float *x, int n)
{
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    double s = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    float inv = (float)(1.0 / s);
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

void op_rope(float *x, int dim, int pairs, const float *cos, const float *sin)
{
    int h = dim / 2;
    for (int i = 0; i < h; i++) {
        int a = pairs ? 2 * i : i, b = pairs ? 2 * i + 1 : i + h;
        float x0 = x[a], x1 = x[b];
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x1 * cos[i] + x0 * sin[i];
    }
}
