/*
 * forward_gdn.c - Qwen3.5-MoE / Qwen3-Next token mixers on the CPU
 * (model_qwen35.c describes the weights; cpu/deltanet.c has the kernels).
 *
 * Linear-attention layer, for a batch of T tokens (any mix of sequences):
 *   qkv = in_proj_qkv(h)  [T][C], C = 2*Hk*dk + Hv*dv   (Qwen3-Next: regrouped from in_proj_qkvz)
 *   qkv = silu(causal depthwise conv1d(qkv))             per sequence, K-1 inputs of state
 *   q, k = l2norm per key head (q / sqrt(dk)); v
 *   g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)        [T][Hv]
 *   o = gated delta rule per value head (value head h reads key head h / (Hv/Hk))
 *   y = out_proj(RMSNorm(o) * norm.weight * silu(z))     per value head
 * The recurrence runs per (head, sequence) over that sequence's tokens in
 * order: in chunks of GDN_CHUNK for a prompt, token by token in decode.
 *
 * Full-attention layer: GQA whose q_proj gives [q | gate] per head; q/k
 * norm and partial rope as Qwen3, then out *= sigmoid(gate) before o_proj.
 *
 * State per linear layer and sequence lives in the session: the conv state
 * [K-1][C] and the recurrent state [Hv][dk][dv], fp32. It has no positions:
 * a sequence restarts at position 0 and cannot be rewound (gdn_begin).
 */
#include "core/err.h"
#include "core/mem.h"
#include "cpu/attn.h"
#include "cpu/deltanet.h"
#include "runtime/forward_gdn.h"

#include <malloc.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GDN_CHUNK 64          /* tokens per chunk of a prompt's recurrence (transformers' chunk_size) */
#define GDN_L2_EPS 1e-6f      /* l2norm eps of q and k (transformers' l2norm default) */
#define GDN_MAX_CONV 64       /* widest conv1d kernel (model_qwen35.c checks the config) */

struct gdn_session {
    float **conv;             /* [n_layer] -> [n_seq][K-1][C]; NULL on full-attention layers */
    float **state;            /* [n_layer] -> [n_seq][Hv][dk][dv] */
    int32_t *len;             /* [n_seq] tokens absorbed into the state */
    float *proj;              /* [n_batch][max(C, 2kd + 2vd, 2*H*hd)] projections (fused / gated q) */
    float *xc;                /* [n_batch][C] after the conv; then q, k normalised */
    float *xg;                /* [n_batch][C] xc gathered by sequence */
    float *z;                 /* [n_batch][vd] */
    float *ab;                /* [n_batch][2 Hv]: b | a, then beta | g */
    float *abg;               /* [n_batch][2 Hv] gathered by sequence */
    float *o, *og;            /* [n_batch][vd] */
    float *gate;              /* [n_batch][H*hd] gated attention */
    int32_t *ord;             /* [n_batch] batch indices sorted by sequence */
    float *scratch;           /* [threads][scratch_stride] */
    int64_t scratch_stride;
};

static int64_t conv_dim(const model_desc *d)
{
    return 2 * (int64_t)d->lin_k_heads * d->lin_k_dim + (int64_t)d->lin_v_heads * d->lin_v_dim;
}

static int64_t proj_width(const model_desc *d)
{
    const int64_t kd = (int64_t)d->lin_k_heads * d->lin_k_dim, vd = (int64_t)d->lin_v_heads * d->lin_v_dim;
    int64_t w = d->lin_fused ? 2 * kd + 2 * vd : 2 * kd + vd;
    int64_t qg = 2 * (int64_t)d->n_head * d->head_dim;
    return w > qg ? w : qg;
}

static int64_t state_floats(const model_desc *d)
{
    return (int64_t)d->lin_v_heads * d->lin_k_dim * d->lin_v_dim;
}

void gdn_session_free(tandem_session *s)
{
    struct gdn_session *g = s->gdn;
    if (!g)
        return;
    for (int l = 0; l < s->e->d.n_layer; l++) {
        if (g->conv)
            free(g->conv[l]);
        if (g->state)
            free(g->state[l]);
    }
    free(g->conv);
    free(g->state);
    void *bufs[] = { g->len, g->proj, g->xc, g->xg, g->z, g->ab, g->abg, g->o, g->og, g->gate, g->ord, g->scratch };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    free(g);
    s->gdn = NULL;
}

int gdn_session_create(tandem_session *s, char *err, size_t errlen)
{
    const model_desc *d = &s->e->d;
    if (!d->layer_linear)
        return 0;
    struct gdn_session *g = calloc(1, sizeof *g);
    if (!g)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    s->gdn = g;
    const int64_t B = s->n_batch, C = conv_dim(d), Hv = d->lin_v_heads, vd = Hv * d->lin_v_dim;
    const int64_t qd = (int64_t)d->n_head * d->head_dim;
    g->scratch_stride = gdn_chunk_scratch_floats(d->lin_k_dim, d->lin_v_dim, GDN_CHUNK);
    g->conv = calloc((size_t)d->n_layer, sizeof *g->conv);
    g->state = calloc((size_t)d->n_layer, sizeof *g->state);
    g->len = calloc((size_t)s->n_seq, sizeof *g->len);
    g->proj = td_alloc((size_t)(B * proj_width(d)) * 4);
    g->xc = td_alloc((size_t)(B * C) * 4);
    g->xg = td_alloc((size_t)(B * C) * 4);
    g->z = td_alloc((size_t)(B * vd) * 4);
    g->ab = td_alloc((size_t)(B * 2 * Hv) * 4);
    g->abg = td_alloc((size_t)(B * 2 * Hv) * 4);
    g->o = td_alloc((size_t)(B * vd) * 4);
    g->og = td_alloc((size_t)(B * vd) * 4);
    g->gate = td_alloc((size_t)(B * qd) * 4);
    g->ord = td_alloc((size_t)B * 4);
    g->scratch = td_alloc((size_t)(pool_size(s->e->pool) * g->scratch_stride) * 4);
    int oom = !g->conv || !g->state || !g->len || !g->proj || !g->xc || !g->xg || !g->z || !g->ab || !g->abg ||
              !g->o || !g->og || !g->gate || !g->ord || !g->scratch;
    for (int l = 0; !oom && l < d->n_layer; l++) {
        if (!d->layer_linear[l])
            continue;
        g->conv[l] = td_calloc((size_t)(s->n_seq * (int64_t)(d->lin_conv - 1) * C + 1), 4);
        g->state[l] = td_calloc((size_t)(s->n_seq * state_floats(d)), 4);
        oom = !g->conv[l] || !g->state[l];
    }
    if (oom) {
        gdn_session_free(s);
        return td_err(err, errlen, TANDEM_ENOMEM, "session: out of memory for the linear-attention state of %d sequence(s)",
                      s->n_seq);
    }
    return 0;
}

int64_t gdn_session_bytes(const tandem_session *s)
{
    const struct gdn_session *g = s->gdn;
    if (!g)
        return 0;
    const void *bufs[] = { g->len, g->proj, g->xc, g->xg, g->z, g->ab, g->abg, g->o, g->og, g->gate, g->ord, g->scratch };
    int64_t n = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        n += bufs[i] ? (int64_t)malloc_usable_size((void *)bufs[i]) : 0;
    for (int l = 0; l < s->e->d.n_layer; l++) {
        n += g->conv[l] ? (int64_t)malloc_usable_size(g->conv[l]) : 0;
        n += g->state[l] ? (int64_t)malloc_usable_size(g->state[l]) : 0;
    }
    return n;
}

int64_t gdn_plan_bytes(const model_desc *d, int n_seq, int n_batch)
{
    if (!d->layer_linear)
        return 0;
    const int64_t B = n_batch, C = conv_dim(d), Hv = d->lin_v_heads, vd = Hv * d->lin_v_dim;
    int64_t n = B * (proj_width(d) + 2 * C + 3 * vd + 4 * Hv + (int64_t)d->n_head * d->head_dim + 1) * 4;
    n += (int64_t)d->n_layer_linear * n_seq * ((d->lin_conv - 1) * C + state_floats(d)) * 4;
    return n;
}

void gdn_engine_prepare(tandem_engine *e)
{
    const model_desc *d = &e->d;
    /* Qwen3_5MoeRMSNorm: x_normed * (1 + w); the DeltaNet's gated norm keeps w */
    const int D = d->d_model;
    for (int i = 0; e->out_norm && i < D; i++)
        e->out_norm[i] += 1.0f;
    for (int l = 0; l < d->n_layer; l++) {
        layer_weights *L = &e->layers[l];
        float *v[] = { L->attn_norm, L->ffn_norm, L->q_norm, L->k_norm };
        int n[] = { D, D, d->head_dim, d->head_dim };
        for (int k = 0; k < 4; k++)
            for (int i = 0; v[k] && i < n[k]; i++)
                v[k][i] += 1.0f;
    }
}

int gdn_begin(tandem_session *s, const tandem_batch *b, char *err, size_t errlen)
{
    struct gdn_session *g = s->gdn;
    if (!g)
        return 0;
    const int T = b->n_tokens;
    for (int t = 0; t < T; t++) { /* the first token of each sequence in the batch */
        int seq = b->seq ? b->seq[t] : 0, first = 1;
        for (int u = 0; u < t && first; u++)
            first = (b->seq ? b->seq[u] : 0) != seq;
        if (first && b->pos[t] != 0 && b->pos[t] != g->len[seq])
            return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                          "sequence %d: its linear-attention state holds %d tokens and cannot continue at position %d "
                          "(it can only be cleared, not truncated)",
                          seq, g->len[seq], b->pos[t]);
    }
    const model_desc *d = &s->e->d;
    const int64_t C = conv_dim(d), cs = (int64_t)(d->lin_conv - 1) * C, ss = state_floats(d);
    for (int t = 0; t < T; t++) {
        int seq = b->seq ? b->seq[t] : 0;
        if (b->pos[t] == 0)
            for (int l = 0; l < d->n_layer; l++)
                if (d->layer_linear[l]) {
                    memset(g->conv[l] + seq * cs, 0, (size_t)cs * 4);
                    memset(g->state[l] + seq * ss, 0, (size_t)ss * 4);
                }
        g->len[seq] = b->pos[t] + 1;
    }
    return 0;
}

/* ---- linear attention ------------------------------------------------------ */

typedef struct {
    tandem_session *s;
    const mat *w;             /* [C][K] conv weights */
    int T, K;
    int64_t C;
    float *conv;              /* layer's conv state */
} conv_ctx;

/* channels [b, e): causal conv over each sequence's inputs, then silu */
static void conv_job(void *arg, int64_t b, int64_t e)
{
    const conv_ctx *c = arg;
    const tandem_session *s = c->s;
    const struct gdn_session *g = s->gdn;
    const int K = c->K;
    const int64_t C = c->C, cs = (int64_t)(K - 1) * C;
    float w[GDN_MAX_CONV];
    for (int64_t ch = b; ch < e; ch++) {
        mat_row_f32(c->w, ch, w);
        for (int t = 0; t < c->T; t++) {
            float *st = c->conv + s->tok_seq[t] * cs + ch; /* [K-1] inputs, oldest first, stride C */
            const float x = g->proj[t * C + ch];
            float y = 0;
            for (int i = 0; i < K - 1; i++)
                y += w[i] * st[i * C];
            y += w[K - 1] * x;
            for (int i = 0; i + 1 < K - 1; i++)
                st[i * C] = st[(i + 1) * C];
            if (K > 1)
                st[(K - 2) * C] = x;
            g->xc[t * C + ch] = y / (1.0f + expf(-y));
        }
    }
}

typedef struct {
    tandem_session *s;
    float *state;             /* layer's recurrent state */
    int T;
} rec_ctx;

/* value heads [b, e): the delta rule over each sequence's run of tokens */
static void rec_job(void *arg, int64_t b, int64_t e)
{
    const rec_ctx *c = arg;
    tandem_session *s = c->s;
    struct gdn_session *g = s->gdn;
    const model_desc *d = &s->e->d;
    const int dk = d->lin_k_dim, dv = d->lin_v_dim, Hv = d->lin_v_heads, r = Hv / d->lin_k_heads;
    const int64_t C = conv_dim(d), kd = (int64_t)d->lin_k_heads * dk, vd = (int64_t)Hv * dv;
    float *scratch = g->scratch + pool_tid() * g->scratch_stride;
    for (int64_t h = b; h < e; h++) {
        for (int t0 = 0; t0 < c->T;) {
            const int seq = s->tok_seq[g->ord[t0]];
            int n = 1;
            while (t0 + n < c->T && s->tok_seq[g->ord[t0 + n]] == seq)
                n++;
            float *S = c->state + ((int64_t)seq * Hv + h) * dk * dv;
            const float *x = g->xg + t0 * C, *ab = g->abg + t0 * 2 * Hv;
            gdn_chunk(S, dk, dv, n, x + (h / r) * dk, C, x + kd + (h / r) * dk, C, x + 2 * kd + h * dv, C,
                      ab + Hv + h, ab + h, 2 * Hv, g->og + t0 * vd + h * dv, vd, n > 1 ? GDN_CHUNK : 1, scratch);
            t0 += n;
        }
    }
}

static float softplus(float x)
{
    return x > 20.0f ? x : log1pf(expf(x)); /* torch's threshold 20 */
}

void gdn_linear_attention(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    struct gdn_session *g = s->gdn;
    const int Hk = d->lin_k_heads, Hv = d->lin_v_heads, dk = d->lin_k_dim, dv = d->lin_v_dim, r = Hv / Hk;
    const int64_t D = d->d_model, C = conv_dim(d), kd = (int64_t)Hk * dk, vd = (int64_t)Hv * dv;
    if (d->lin_fused) {
        /* Qwen3-Next: per key head [q dk | k dk | v r*dv | z r*dv] and [b r | a r]: regroup into
         * qkv = [all q | all k | all v], z, and b | a */
        const int64_t gw = 2 * dk + 2 * (int64_t)r * dv;
        op_matmul(e->pool, g->proj, 2 * kd + 2 * vd, s->h, D, T, &L->la_qkvz, NULL);
        op_matmul(e->pool, g->abg, 2 * Hv, s->h, D, T, &L->la_ba, NULL);
        for (int t = 0; t < T; t++) {
            const float *src = g->proj + t * (2 * kd + 2 * vd), *ba = g->abg + t * 2 * Hv;
            float *p = g->xg + t * C, *z = g->z + t * vd, *ab = g->ab + t * 2 * Hv;
            for (int k = 0; k < Hk; k++) {
                const float *grp = src + k * gw;
                memcpy(p + k * dk, grp, (size_t)dk * 4);
                memcpy(p + kd + k * dk, grp + dk, (size_t)dk * 4);
                memcpy(p + 2 * kd + (int64_t)k * r * dv, grp + 2 * dk, (size_t)r * dv * 4);
                memcpy(z + (int64_t)k * r * dv, grp + 2 * dk + (int64_t)r * dv, (size_t)r * dv * 4);
                memcpy(ab + k * r, ba + k * 2 * r, (size_t)r * 4);
                memcpy(ab + Hv + k * r, ba + k * 2 * r + r, (size_t)r * 4);
            }
        }
        memcpy(g->proj, g->xg, (size_t)(T * C) * 4); /* the conv reads proj */
    } else {
        op_matmul(e->pool, g->proj, C, s->h, D, T, &L->la_qkv, NULL);
        op_matmul(e->pool, g->z, vd, s->h, D, T, &L->la_z, NULL);
        op_matmul(e->pool, g->ab, 2 * Hv, s->h, D, T, &L->la_b, NULL);
        op_matmul(e->pool, g->ab + Hv, 2 * Hv, s->h, D, T, &L->la_a, NULL);
    }
    conv_ctx cc = { s, &L->la_conv, T, d->lin_conv, C, g->conv[l] };
    pool_run(e->pool, C, 64, conv_job, &cc);
    /* q, k normalised; beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias) */
    const float qscale = (float)(1.0 / sqrt((double)dk));
    for (int t = 0; t < T; t++) {
        float *x = g->xc + t * C, *ab = g->ab + t * 2 * Hv;
        for (int k = 0; k < Hk; k++) {
            gdn_l2norm(x + k * dk, dk, GDN_L2_EPS);
            gdn_l2norm(x + kd + k * dk, dk, GDN_L2_EPS);
            for (int i = 0; i < dk; i++)
                x[k * dk + i] *= qscale;
        }
        for (int h = 0; h < Hv; h++) {
            const float bb = ab[h], aa = ab[Hv + h];
            ab[h] = 1.0f / (1.0f + expf(-bb));
            ab[Hv + h] = -expf(L->la_a_log[h]) * softplus(aa + L->la_dt_bias[h]);
        }
    }
    /* gather by sequence (stable), run the recurrence per head, scatter back */
    int n = 0;
    for (int t = 0; t < T; t++) {
        int first = 1;
        for (int u = 0; u < t && first; u++)
            first = s->tok_seq[u] != s->tok_seq[t];
        for (int u = t; first && u < T; u++)
            if (s->tok_seq[u] == s->tok_seq[t])
                g->ord[n++] = u;
    }
    for (int i = 0; i < T; i++) {
        memcpy(g->xg + i * C, g->xc + g->ord[i] * C, (size_t)C * 4);
        memcpy(g->abg + i * 2 * Hv, g->ab + g->ord[i] * 2 * Hv, (size_t)(2 * Hv) * 4);
    }
    rec_ctx rc = { s, g->state[l], T };
    pool_run(e->pool, Hv, 1, rec_job, &rc);
    for (int i = 0; i < T; i++) {
        const int t = g->ord[i];
        for (int h = 0; h < Hv; h++)
            gdn_gated_norm(g->o + t * vd + h * dv, g->og + i * vd + h * dv, g->z + t * vd + h * dv, L->la_norm, dv,
                           d->rms_eps);
    }
    op_matmul(e->pool, s->y, D, g->o, vd, T, &L->la_out, NULL);
}

/* ---- gated full attention ------------------------------------------------- */

void gdn_gated_attention(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    struct gdn_session *g = s->gdn;
    const int hd = d->head_dim, H = d->n_head, KH = d->n_kv_head, half = d->rope_dim / 2;
    const int64_t D = d->d_model, qd = (int64_t)H * hd, kd = (int64_t)KH * hd;
    kv_layer *kv = &s->kv[l];
    op_matmul(e->pool, g->proj, 2 * qd, s->h, D, T, &L->q, NULL);
    op_matmul(e->pool, s->kvbuf, 2 * kd, s->h, D, T, &L->k, NULL);
    op_matmul(e->pool, s->kvbuf + kd, 2 * kd, s->h, D, T, &L->v, NULL);
    for (int t = 0; t < T; t++) {
        const float *cs = s->rope_cs + (int64_t)t * 2 * half;
        float *q = s->q + t * qd, *k = s->kvbuf + t * 2 * kd, *v = k + kd;
        for (int h = 0; h < H; h++) { /* per head [q | gate] */
            memcpy(q + h * hd, g->proj + t * 2 * qd + h * 2 * hd, (size_t)hd * 4);
            memcpy(g->gate + t * qd + h * hd, g->proj + t * 2 * qd + h * 2 * hd + hd, (size_t)hd * 4);
            op_rmsnorm(q + h * hd, q + h * hd, L->q_norm, hd, d->rms_eps);
            op_rope(q + h * hd, d->rope_dim, d->rope == ROPE_PAIRS, cs, cs + half);
        }
        for (int h = 0; h < KH; h++) {
            op_rmsnorm(k + h * hd, k + h * hd, L->k_norm, hd, d->rms_eps);
            op_rope(k + h * hd, d->rope_dim, d->rope == ROPE_PAIRS, cs, cs + half);
        }
        int64_t cell = (int64_t)s->tok_seq[t] * s->n_ctx + s->tok_pos[t];
        memcpy(kv->k + cell * kd, k, (size_t)kd * 4);
        memcpy(kv->v + cell * kd, v, (size_t)kd * 4);
    }
    attn_gqa_params a = { H, KH, hd, d->attn_scale, d->sliding_window, kv->k, kv->v, (int64_t)s->n_ctx * kd, kd };
    attn_gqa(e->pool, &a, T, s->q, s->tok_seq, s->tok_pos, s->att, s->attn_scratch, s->attn_scratch_stride);
    for (int64_t i = 0; i < T * qd; i++)
        s->att[i] *= 1.0f / (1.0f + expf(-g->gate[i]));
    op_matmul(e->pool, s->y, D, s->att, qd, T, &L->o, NULL);
}
