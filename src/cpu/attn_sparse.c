/*
 * attn_sparse.c - the DSA indexer's top-k selection and MLA over a
 * selection (reference, fp32); see attn_sparse.h.
 *
 * The selection sorts (score, position) pairs: O(n log n) per token, small
 * next to the indexer's n * n_head * head_dim dot products. The attention
 * follows attn.c's mla_job step for step, only over the listed positions, so
 * a full selection gives attn_mla's result bit for bit.
 */
#include "cpu/attn_sparse.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float dot(const float *a, const float *b, int n)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* ---- indexer ------------------------------------------------------------- */

typedef struct {
    float s;
    int32_t j;
} scored;

/* higher score first; equal scores: earlier position first (a total order,
 * so the selection does not depend on qsort's algorithm) */
static int by_score(const void *x, const void *y)
{
    const scored *a = x, *b = y;
    if (a->s != b->s)
        return a->s > b->s ? -1 : 1;
    return (a->j > b->j) - (a->j < b->j);
}

static int by_pos(const void *x, const void *y)
{
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    return (a > b) - (a < b);
}

int64_t dsa_index_scratch_floats(int n_ctx)
{
    int64_t n = 2 * (int64_t)n_ctx + 64; /* scored pairs */
    return (n + 15) & ~(int64_t)15;
}

typedef struct {
    const dsa_index_params *a;
    const float *q, *w;
    const int32_t *seq, *pos;
    int32_t *sel, *n_sel;
    int64_t sel_stride;
    float *scratch;
    int64_t scratch_stride;
} index_ctx;

static void index_job(void *arg, int64_t b, int64_t e)
{
    const index_ctx *c = arg;
    const dsa_index_params *a = c->a;
    const int H = a->n_head, hd = a->head_dim;
    scored *sc = (scored *)(c->scratch + pool_tid() * c->scratch_stride);
    for (int64_t t = b; t < e; t++) {
        const int p = c->pos[t], n = p + 1;
        int32_t *sel = c->sel + t * c->sel_stride;
        if (n <= a->topk) { /* everything is selected: no scores needed */
            for (int j = 0; j < n; j++)
                sel[j] = j;
            c->n_sel[t] = n;
            continue;
        }
        const float *q = c->q + t * (int64_t)H * hd, *w = c->w + t * (int64_t)H;
        const float *K = a->k + c->seq[t] * a->seq_stride;
        for (int j = 0; j < n; j++) {
            const float *kj = K + (int64_t)j * hd;
            float s = 0;
            for (int h = 0; h < H; h++) {
                float d = dot(q + (int64_t)h * hd, kj, hd) * a->scale;
                s += w[h] * (d > 0 ? d : 0);
            }
            sc[j].s = s;
            sc[j].j = j;
        }
        qsort(sc, (size_t)n, sizeof *sc, by_score);
        for (int i = 0; i < a->topk; i++)
            sel[i] = sc[i].j;
        qsort(sel, (size_t)a->topk, sizeof *sel, by_pos);
        c->n_sel[t] = a->topk;
    }
}

void dsa_index_select(pool *p, const dsa_index_params *a, int T, const float *q, const float *w,
                      const int32_t *seq, const int32_t *pos, int32_t *sel, int64_t sel_stride, int32_t *n_sel,
                      float *scratch, int64_t scratch_stride)
{
    index_ctx c = { a, q, w, seq, pos, sel, n_sel, sel_stride, scratch, scratch_stride };
    pool_run(p, T, 1, index_job, &c);
}

/* ---- MLA over a selection ------------------------------------------------ */

typedef struct {
    const attn_mla_params *a;
    const float *q;
    const int32_t *seq, *sel, *n_sel;
    int64_t sel_stride;
    float *out, *scratch;
    int64_t scratch_stride;
} mla_sparse_ctx;

static void mla_sparse_job(void *arg, int64_t b, int64_t e)
{
    const mla_sparse_ctx *c = arg;
    const attn_mla_params *a = c->a;
    const int R = a->rank, qk = a->nope + a->rope, kvb_rows = a->nope + a->v_dim;
    float *base = c->scratch + pool_tid() * c->scratch_stride;
    float *q_lat = base, *o_lat = base + R, *row = base + 2 * R, *sc = base + 3 * R;
    for (int64_t i = b; i < e; i++) {
        int t = (int)(i / a->n_head), h = (int)(i % a->n_head);
        const int32_t *sel = c->sel + t * c->sel_stride;
        const int n = c->n_sel[t];
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
        for (int k = 0; k < n; k++) {
            int64_t j = sel[k];
            float s = (dot(q_lat, ckv + j * R, R) + dot(q + a->nope, kpe + j * a->rope, a->rope)) * a->scale;
            sc[k] = s;
            m = s > m ? s : m;
        }
        double sum = 0;
        for (int k = 0; k < n; k++) {
            sc[k] = expf(sc[k] - m);
            sum += sc[k];
        }
        float inv = (float)(1.0 / sum);
        memset(o_lat, 0, (size_t)R * sizeof *o_lat);
        for (int k = 0; k < n; k++) {
            float w = sc[k] * inv;
            const float *cr = ckv + (int64_t)sel[k] * R;
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

void attn_mla_sparse(pool *p, const attn_mla_params *a, int T, const float *q, const int32_t *seq,
                     const int32_t *sel, int64_t sel_stride, const int32_t *n_sel, float *out, float *scratch,
                     int64_t scratch_stride)
{
    mla_sparse_ctx c = { a, q, seq, sel, n_sel, sel_stride, out, scratch, scratch_stride };
    pool_run(p, (int64_t)T * a->n_head, 1, mla_sparse_job, &c);
}
