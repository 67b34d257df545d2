/*
 * attn.c - GQA and MLA attention over the KV cache: the references (fp32)
 * and the dispatch to the per-ISA GQA kernels (attn_avx512.c).
 *
 * The references take the whole row of scores, their max and fp32
 * exponentials, as transformers' eager attention does after its matmul; sums
 * of probabilities run in double so long contexts do not lose the small
 * terms. They are the truth the fast kernels are tested against (tests/
 * test_attn.c) and what TANDEM_CPU=ref runs.
 */
#include "cpu/attn.h"
#include "core/isa.h"
#include "cpu/attn_impl.h"

#include <math.h>
#include <string.h>

int64_t attn_scratch_floats(int n_ctx, int mla_rank, int head_dim)
{
    int64_t n = n_ctx + 3 * (int64_t)mla_rank + 2 * (int64_t)head_dim + 64;
    if (head_dim > 0) { /* the flash kernels' work and partial areas (attn_impl.h) */
        int64_t f = attn_work_floats(head_dim) + attn_part_items() * ATT_ROWS * ((int64_t)head_dim + 2);
        n = f > n ? f : n;
    }
    return (n + 15) & ~(int64_t)15;
}

static float dot(const float *a, const float *b, int n)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

typedef struct {
    const attn_gqa_params *a;
    const float *q;
    const int32_t *seq, *pos;
    float *out, *scratch;
    int64_t scratch_stride;
} gqa_ctx;

static void gqa_job(void *arg, int64_t b, int64_t e)
{
    const gqa_ctx *c = arg;
    const attn_gqa_params *a = c->a;
    const int hd = a->head_dim, group = a->n_head / a->n_kv_head;
    float *sc = c->scratch + pool_tid() * c->scratch_stride;
    for (int64_t i = b; i < e; i++) {
        int t = (int)(i / a->n_head), h = (int)(i % a->n_head), g = h / group;
        int p = c->pos[t];
        int lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        const float *q = c->q + (int64_t)t * a->n_head * hd + (int64_t)h * hd;
        const float *K = a->k + c->seq[t] * a->seq_stride + (int64_t)g * hd;
        const float *V = a->v + c->seq[t] * a->seq_stride + (int64_t)g * hd;
        float m = -INFINITY;
        for (int j = lo; j <= p; j++) {
            float s = dot(q, K + j * a->row_stride, hd) * a->scale;
            sc[j - lo] = s;
            m = s > m ? s : m;
        }
        double sum = 0;
        for (int j = lo; j <= p; j++) {
            sc[j - lo] = expf(sc[j - lo] - m);
            sum += sc[j - lo];
        }
        float inv = (float)(1.0 / sum);
        float *o = c->out + (int64_t)t * a->n_head * hd + (int64_t)h * hd;
        memset(o, 0, (size_t)hd * sizeof *o);
        for (int j = lo; j <= p; j++) {
            float w = sc[j - lo] * inv;
            const float *v = V + j * a->row_stride;
            for (int d = 0; d < hd; d++)
                o[d] += w * v[d];
        }
    }
}

void attn_gqa_ref(pool *p, const attn_gqa_params *a, int T, const float *q, const int32_t *seq, const int32_t *pos,
                  float *out, float *scratch, int64_t scratch_stride)
{
    gqa_ctx c = { a, q, seq, pos, out, scratch, scratch_stride };
    pool_run(p, (int64_t)T * a->n_head, 1, gqa_job, &c);
}

void attn_gqa(pool *p, const attn_gqa_params *a, int T, const float *q, const int32_t *seq, const int32_t *pos,
              float *out, float *scratch, int64_t scratch_stride)
{
    if (isa_current() >= ISA_AVX512 && a->head_dim % 16 == 0)
        attn_gqa_avx512(p, a, T, q, seq, pos, out, scratch, scratch_stride);
    else
        attn_gqa_ref(p, a, T, q, seq, pos, out, scratch, scratch_stride);
}

typedef struct {
    const attn_mla_params *a;
    const float *q;
    const int32_t *seq, *pos;
    float *out, *scratch;
    int64_t scratch_stride;
} mla_ctx;

static void mla_job(void *arg, int64_t b, int64_t e)
{
    const mla_ctx *c = arg;
    const attn_mla_params *a = c->a;
    const int R = a->rank, qk = a->nope + a->rope, kvb_rows = a->nope + a->v_dim;
    float *base = c->scratch + pool_tid() * c->scratch_stride;
    float *q_lat = base, *o_lat = base + R, *row = base + 2 * R, *sc = base + 3 * R;
    for (int64_t i = b; i < e; i++) {
        int t = (int)(i / a->n_head), h = (int)(i % a->n_head);
        int p = c->pos[t];
        const float *q = c->q + (int64_t)t * a->n_head * qk + (int64_t)h * qk;
        /* absorb: q_lat = sum_i q_nope[i] * W_uk[h][i][:] */
        memset(q_lat, 0, (size_t)R * sizeof *q_lat);
        for (int d = 0; d < a->nope; d++) {
            mat_row_f32(a->kv_b, (int64_t)h * kvb_rows + d, row);
            float qd = q[d];
            for (int r = 0; r < R; r++)
                q_lat[r] += qd * row[r];
        }
        const float *ckv = a->ckv + c->seq[t] * a->ckv_seq_stride;
        const float *kpe = a->kpe + c->seq[t] * a->kpe_seq_stride;
        float m = -INFINITY;
        for (int j = 0; j <= p; j++) {
            float s = (dot(q_lat, ckv + (int64_t)j * R, R) + dot(q + a->nope, kpe + (int64_t)j * a->rope, a->rope)) *
                      a->scale;
            sc[j] = s;
            m = s > m ? s : m;
        }
        double sum = 0;
        for (int j = 0; j <= p; j++) {
            sc[j] = expf(sc[j] - m);
            sum += sc[j];
        }
        float inv = (float)(1.0 / sum);
        memset(o_lat, 0, (size_t)R * sizeof *o_lat);
        for (int j = 0; j <= p; j++) {
            float w = sc[j] * inv;
            const float *cr = ckv + (int64_t)j * R;
            for (int r = 0; r < R; r++)
                o_lat[r] += w * cr[r];
        }
        float *o = c->out + (int64_t)t * a->n_head * a->v_dim + (int64_t)h * a->v_dim;
        for (int d = 0; d < a->v_dim; d++) {
            mat_row_f32(a->kv_b, (int64_t)h * kvb_rows + a->nope + d, row);
            o[d] = dot(row, o_lat, R);
        }
    }
}

void attn_mla(pool *p, const attn_mla_params *a, int T, const float *q, const int32_t *seq, const int32_t *pos,
              float *out, float *scratch, int64_t scratch_stride)
{
    mla_ctx c = { a, q, seq, pos, out, scratch, scratch_stride };
    pool_run(p, (int64_t)T * a->n_head, 1, mla_job, &c);
}
