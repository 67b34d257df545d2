/*
 * forward_oss.c - gpt-oss on the CPU (model_oss.c describes the weights).
 *
 * Attention: GQA with q/k/v/o biases, full-head rope (yarn), the layer's
 * window (sliding_window on "sliding_attention" layers, else none) and a
 * sink logit per head (cpu/attn_sink.c).
 *
 * MoE: logits = router(h) + bias; the top-k logits (equal logits: the lower
 * expert first) are softmaxed among themselves; each chosen expert e gives
 *   gu  = h . gate_up_proj[e] + gate_up_proj_bias[e]       [2F], gate = gu[2f], up = gu[2f+1]
 *   act = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g),  g = min(gate, limit)
 *   out = act . down_proj[e] + down_proj_bias[e]            [D]
 * The weights are read as transformers stores them, [in][out] rows, so this
 * is the exact fp32 reference loop (--cpu-experts f32): the packed MoE
 * operator has no biases or clamped SwiGLU yet.
 */
#include "core/err.h"
#include "core/mem.h"
#include "cpu/attn_sink.h"
#include "runtime/forward_oss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int64_t scratch_width(const model_desc *d)
{
    const int64_t f2 = 2 * (int64_t)d->d_ff_expert;
    return f2 > d->d_model ? f2 : d->d_model;
}

int oss_session_create(tandem_session *s, char *err, size_t errlen)
{
    if (!s->e->d.oss)
        return 0;
    s->oss_scratch = td_alloc((size_t)(4 * scratch_width(&s->e->d)) * 4);
    if (!s->oss_scratch)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    return 0;
}

void oss_session_free(tandem_session *s)
{
    free(s->oss_scratch);
    s->oss_scratch = NULL;
}

void oss_attention(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int hd = d->head_dim, H = d->n_head, KH = d->n_kv_head, half = d->rope_dim / 2;
    const int64_t D = d->d_model, qd = (int64_t)H * hd, kd = (int64_t)KH * hd;
    kv_layer *kv = &s->kv[l];
    op_matmul(e->pool, s->q, qd, s->h, D, T, &L->q, L->q_bias);
    op_matmul(e->pool, s->kvbuf, 2 * kd, s->h, D, T, &L->k, L->k_bias);
    op_matmul(e->pool, s->kvbuf + kd, 2 * kd, s->h, D, T, &L->v, L->v_bias);
    for (int t = 0; t < T; t++) {
        const float *cs = s->rope_cs + (int64_t)t * 2 * half;
        float *q = s->q + t * qd, *k = s->kvbuf + t * 2 * kd, *v = k + kd;
        for (int h = 0; h < H; h++)
            op_rope(q + h * hd, d->rope_dim, d->rope == ROPE_PAIRS, cs, cs + half);
        for (int h = 0; h < KH; h++)
            op_rope(k + h * hd, d->rope_dim, d->rope == ROPE_PAIRS, cs, cs + half);
        int64_t cell = (int64_t)s->tok_seq[t] * s->n_ctx + s->tok_pos[t];
        memcpy(kv->k + cell * kd, k, (size_t)kd * 4);
        memcpy(kv->v + cell * kd, v, (size_t)kd * 4);
    }
    const int window = d->layer_window[l] ? d->sliding_window : 0;
    attn_gqa_params a = { H, KH, hd, d->attn_scale, window, kv->k, kv->v, (int64_t)s->n_ctx * kd, kd };
    attn_gqa_sink(e->pool, &a, L->sinks, T, s->q, s->tok_seq, s->tok_pos, s->att, s->attn_scratch,
                  s->attn_scratch_stride);
    op_matmul(e->pool, s->y, D, s->att, qd, T, &L->o, L->o_bias);
}

/* ids/w [K] of one token: the K largest logits, softmaxed among themselves */
static void route(const float *logits, int E, int K, int32_t *ids, float *w)
{
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int x = 0; x < E; x++) {
            int taken = 0;
            for (int j = 0; j < k && !taken; j++)
                taken = ids[j] == x;
            if (!taken && (best < 0 || logits[x] > logits[best]))
                best = x;
        }
        ids[k] = best;
    }
    float m = logits[ids[0]], sum = 0; /* ids[0] holds the largest */
    for (int k = 0; k < K; k++)
        sum += w[k] = expf(logits[ids[k]] - m);
    for (int k = 0; k < K; k++)
        w[k] /= sum;
}

void oss_moe(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int E = d->n_expert, K = d->n_expert_used;
    const int64_t D = d->d_model, F = d->d_ff_expert, W = scratch_width(d);
    float *row = s->oss_scratch, *gu = row + W, *act = gu + W, *out = act + W;
    const float lim = d->swiglu_limit, alpha = d->swiglu_alpha;
    op_matmul(e->pool, s->router_logits, E, s->h, D, T, &L->router, L->oss_router_bias);
    memset(s->y, 0, (size_t)(T * D) * 4);
    for (int t = 0; t < T; t++) {
        int32_t *ids = s->ids + t * K;
        float *wts = s->wts + t * K;
        route(s->router_logits + (int64_t)t * E, E, K, ids, wts);
        const float *x = s->h + t * D;
        for (int k = 0; k < K; k++) {
            const int64_t ex = ids[k];
            memset(gu, 0, (size_t)(2 * F) * 4);
            for (int64_t i = 0; i < D; i++) {
                mat_row_f32(&L->oss_gu, ex * D + i, row);
                const float xi = x[i];
                for (int64_t j = 0; j < 2 * F; j++)
                    gu[j] += xi * row[j];
            }
            mat_row_f32(&L->oss_gu_bias, ex, row);
            for (int64_t f = 0; f < F; f++) {
                float g = gu[2 * f] + row[2 * f], u = gu[2 * f + 1] + row[2 * f + 1];
                g = g < lim ? g : lim;
                u = u < -lim ? -lim : u > lim ? lim : u;
                act[f] = (u + 1.0f) * (g / (1.0f + expf(-g * alpha)));
            }
            memset(out, 0, (size_t)D * 4);
            for (int64_t f = 0; f < F; f++) {
                mat_row_f32(&L->oss_down, ex * F + f, row);
                const float af = act[f];
                for (int64_t j = 0; j < D; j++)
                    out[j] += af * row[j];
            }
            mat_row_f32(&L->oss_down_bias, ex, row);
            float *y = s->y + t * D;
            for (int64_t j = 0; j < D; j++)
                y[j] += wts[k] * (out[j] + row[j]);
        }
    }
}
