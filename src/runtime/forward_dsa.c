/*
 * forward_dsa.c - DeepSeek sparse attention in the CPU forward pass
 * (DeepSeek-V3.2, GLM-5; model_dsa.c describes the weights).
 *
 * MLA (forward.c) computes the queries and writes the latent cache rows of
 * the batch; then, per layer with an indexer:
 *   qi = wq_b(q_lora latent)          [T][IH][ID]   rope on dims [0, rope)
 *   ki = LayerNorm(wk(h))             [T][ID]       rope on dims [0, rope) -> indexer key cache
 *   wi = weights_proj(h) * IH^-0.5    [T][IH]
 *   select per token the index_topk positions of highest
 *   sum_h wi[h] * relu(qi[h] . ki[j] / sqrt(ID))       (cpu/attn_sparse.c)
 * and MLA attends to those positions only. A GLM-5 "shared" layer has no
 * indexer (and no indexer cache): it reuses the selection the previous layer
 * left in the session. Rope uses the model's cos/sin (yarn factor included),
 * half-split in DeepSeek-V3.2 and interleaved in GLM-5, as transformers'
 * DeepseekV32Indexer / GlmMoeDsaIndexer.
 *
 * The indexer key cache sits in the session beside the latent cache,
 * fp32, [n_seq][n_ctx][index_head_dim] per indexer layer.
 */
#include "core/err.h"
#include "core/mem.h"
#include "cpu/attn_sparse.h"
#include "runtime/forward_dsa.h"

#include <malloc.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* LayerNorm eps of the indexer's k_norm (nn.LayerNorm(head_dim, eps=1e-6) in transformers) */
#define DSA_K_NORM_EPS 1e-6f

struct dsa_session {
    float **ik;              /* [n_layer] -> [n_seq][n_ctx][ID]; NULL on shared layers */
    float *q;                /* [n_batch][IH*ID] */
    float *w;                /* [n_batch][IH] */
    float *k;                /* [n_batch][ID] */
    int32_t *sel;            /* [n_batch][sel_stride] selected positions, ascending */
    int32_t *n_sel;          /* [n_batch] */
    int64_t sel_stride;      /* min(index_topk, n_ctx) */
    float *scratch;          /* [threads][scratch_stride] */
    int64_t scratch_stride;
};

static int64_t sel_width(const model_desc *d, int n_ctx)
{
    return d->index_topk < n_ctx ? d->index_topk : n_ctx;
}

void dsa_session_free(tandem_session *s)
{
    struct dsa_session *ds = s->dsa;
    if (!ds)
        return;
    for (int l = 0; ds->ik && l < s->e->d.n_layer; l++)
        free(ds->ik[l]);
    free(ds->ik);
    free(ds->q);
    free(ds->w);
    free(ds->k);
    free(ds->sel);
    free(ds->n_sel);
    free(ds->scratch);
    free(ds);
    s->dsa = NULL;
}

int dsa_session_create(tandem_session *s, char *err, size_t errlen)
{
    const model_desc *d = &s->e->d;
    if (!d->dsa)
        return 0;
    struct dsa_session *ds = calloc(1, sizeof *ds);
    if (!ds)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    s->dsa = ds;
    const int64_t B = s->n_batch, IH = d->index_n_heads, ID = d->index_head_dim;
    const int64_t cells = (int64_t)s->n_seq * s->n_ctx;
    ds->sel_stride = sel_width(d, s->n_ctx);
    ds->scratch_stride = dsa_index_scratch_floats(s->n_ctx);
    ds->ik = calloc((size_t)d->n_layer, sizeof *ds->ik);
    ds->q = td_alloc((size_t)(B * IH * ID) * 4);
    ds->w = td_alloc((size_t)(B * IH) * 4);
    ds->k = td_alloc((size_t)(B * ID) * 4);
    ds->sel = td_alloc((size_t)(B * ds->sel_stride) * 4);
    ds->n_sel = td_alloc((size_t)B * 4);
    ds->scratch = td_alloc((size_t)(pool_size(s->e->pool) * ds->scratch_stride) * 4);
    int oom = !ds->ik || !ds->q || !ds->w || !ds->k || !ds->sel || !ds->n_sel || !ds->scratch;
    for (int l = 0; !oom && l < d->n_layer; l++)
        if (!d->index_shared[l])
            oom = !(ds->ik[l] = td_alloc((size_t)(cells * ID) * 4));
    if (oom) {
        dsa_session_free(s);
        return td_err(err, errlen, TANDEM_ENOMEM,
                      "session: out of memory for the sparse-attention indexer cache (%d sequence(s) x %d tokens)",
                      s->n_seq, s->n_ctx);
    }
    return 0;
}

int64_t dsa_session_bytes(const tandem_session *s)
{
    const struct dsa_session *ds = s->dsa;
    if (!ds)
        return 0;
    const void *bufs[] = { ds->q, ds->w, ds->k, ds->sel, ds->n_sel, ds->scratch };
    int64_t n = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        n += bufs[i] ? (int64_t)malloc_usable_size((void *)bufs[i]) : 0;
    for (int l = 0; ds->ik && l < s->e->d.n_layer; l++)
        n += ds->ik[l] ? (int64_t)malloc_usable_size(ds->ik[l]) : 0;
    return n;
}

/* td_alloc's real size of n bytes, as plan.c counts it */
static int64_t alloc_size(int64_t n)
{
    if (n >= (int64_t)TD_HUGE_MIN)
        return (n + (int64_t)TD_HUGE - 1) / (int64_t)TD_HUGE * (int64_t)TD_HUGE;
    return n > 0 ? (n + TD_ALIGN - 1) / TD_ALIGN * TD_ALIGN : TD_ALIGN;
}

int64_t dsa_plan_bytes(const model_desc *d, int n_seq, int n_ctx, int n_batch, int n_threads)
{
    if (!d->dsa)
        return 0;
    const int64_t B = n_batch, IH = d->index_n_heads, ID = d->index_head_dim;
    int64_t n = alloc_size(B * IH * ID * 4) + alloc_size(B * IH * 4) + alloc_size(B * ID * 4) +
                alloc_size(B * sel_width(d, n_ctx) * 4) + alloc_size(B * 4) +
                alloc_size((int64_t)n_threads * dsa_index_scratch_floats(n_ctx) * 4);
    for (int l = 0; l < d->n_layer; l++)
        if (!d->index_shared[l])
            n += alloc_size((int64_t)n_seq * n_ctx * ID * 4);
    return n;
}

/* y = LayerNorm(x) * w + b over n values (biased variance, as torch) */
static void layer_norm(float *x, const float *w, const float *b, int n, float eps)
{
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++)
        mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++)
        var += (x[i] - mean) * (x[i] - mean);
    var /= n;
    float inv = (float)(1.0 / sqrt(var + eps)), m = (float)mean;
    for (int i = 0; i < n; i++)
        x[i] = (x[i] - m) * inv * w[i] + b[i];
}

void dsa_attention(tandem_session *s, int l, int T, const attn_mla_params *a, const float *qa, int64_t ldqa)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    struct dsa_session *ds = s->dsa;
    const int IH = d->index_n_heads, ID = d->index_head_dim, rope = d->qk_rope_dim, half = rope / 2;
    const int64_t D = d->d_model;
    if (!d->index_shared[l]) {
        float *ik = ds->ik[l];
        op_matmul(e->pool, ds->k, ID, s->h, D, T, &L->ix_wk, NULL);
        int scores = 0; /* a token with more than index_topk positions needs the scores */
        for (int t = 0; t < T; t++) {
            const float *cs = s->rope_cs + (int64_t)t * 2 * half;
            float *k = ds->k + (int64_t)t * ID;
            layer_norm(k, L->ix_k_norm, L->ix_k_norm_bias, ID, DSA_K_NORM_EPS);
            op_rope(k, rope, d->index_rope_pairs, cs, cs + half);
            int64_t cell = (int64_t)s->tok_seq[t] * s->n_ctx + s->tok_pos[t];
            memcpy(ik + cell * ID, k, (size_t)ID * 4);
            scores |= s->tok_pos[t] >= d->index_topk;
        }
        if (scores) {
            op_matmul(e->pool, ds->q, (int64_t)IH * ID, qa, ldqa, T, &L->ix_wq_b, NULL);
            op_matmul(e->pool, ds->w, IH, s->h, D, T, &L->ix_w, NULL);
            const float wscale = (float)(1.0 / sqrt((double)IH));
            for (int t = 0; t < T; t++) {
                const float *cs = s->rope_cs + (int64_t)t * 2 * half;
                for (int h = 0; h < IH; h++)
                    op_rope(ds->q + ((int64_t)t * IH + h) * ID, rope, d->index_rope_pairs, cs, cs + half);
                for (int h = 0; h < IH; h++)
                    ds->w[(int64_t)t * IH + h] *= wscale;
            }
        }
        dsa_index_params ip = { IH, ID, (int)ds->sel_stride, (float)(1.0 / sqrt((double)ID)), ik, (int64_t)s->n_ctx * ID };
        dsa_index_select(e->pool, &ip, T, ds->q, ds->w, s->tok_seq, s->tok_pos, ds->sel, ds->sel_stride, ds->n_sel,
                         ds->scratch, ds->scratch_stride);
    }
    attn_mla_sparse(e->pool, a, T, s->q, s->tok_seq, ds->sel, ds->sel_stride, ds->n_sel, s->att, s->attn_scratch,
                    s->attn_scratch_stride);
}
