/*
 * session.c - tandem_session: the KV cache and all scratch of the forward
 * pass, allocated once at creation so that no token allocates.
 */
#include "core/err.h"
#include "core/mem.h"
#include "cpu/attn.h"
#include "cpu/moe/moe.h"
#include "runtime/engine.h"
#include "runtime/forward_oss.h"
#include "runtime/hybrid.h"
#include "runtime/plan.h"

#include <malloc.h>
#include <stdlib.h>
#include <string.h>

void tandem_session_params_default(tandem_session_params *p)
{
    memset(p, 0, sizeof *p);
    p->n_seq = 1;
    p->n_batch = 512;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

void tandem_session_free(tandem_session *s)
{
    if (!s)
        return;
    hybrid_session_free(s); /* first: it unpins s->logits */
    dsa_session_free(s);
    gdn_session_free(s);
    oss_session_free(s);
    moe_scratch_free(s->moe_s);
    if (s->kv)
        for (int l = 0; l < s->e->d.n_layer; l++) {
            free(s->kv[l].k);
            free(s->kv[l].v);
            free(s->kv[l].ckv);
            free(s->kv[l].kpe);
        }
    free(s->kv);
    free(s->len);
    free(s->route_counts);
    void *bufs[] = { s->x, s->h, s->q, s->kvbuf, s->att, s->ff1, s->ff2, s->y, s->rope_cs, s->tok_seq,
                     s->tok_pos, s->ids, s->wts, s->router_logits, s->route_scratch, s->exp_count, s->exp_tok,
                     s->exp_w, s->gx, s->gg, s->gu, s->gy, s->attn_scratch, s->logits, s->logits_row };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    free(s);
}

void session_dims_of(const model_desc *d, session_dims *out)
{
    if (d->attn == ATTN_GQA) {
        out->q = (int64_t)d->n_head * d->head_dim;
        out->kv = 2 * (int64_t)d->n_kv_head * d->head_dim;
        out->att = out->q;
    } else {
        out->q = (int64_t)d->n_head * (d->qk_nope_dim + d->qk_rope_dim);
        out->kv = d->kv_lora_rank + d->qk_rope_dim + d->q_lora_rank;
        out->att = (int64_t)d->n_head * d->v_head_dim;
    }
    out->ff = max64(max64(d->d_ff, d->d_ff_shared), d->d_ff_expert);
}

int tandem_session_create(tandem_engine *e, const tandem_session_params *p, tandem_session **out, char *err,
                          size_t errlen)
{
    *out = NULL;
    tandem_session_params dp;
    if (!p) {
        tandem_session_params_default(&dp);
        p = &dp;
    }
    const model_desc *d = &e->d;
    int n_ctx = p->n_ctx ? p->n_ctx : (d->max_ctx < 4096 ? d->max_ctx : 4096);
    if (p->n_seq < 1 || p->n_seq > 4096)
        return td_err(err, errlen, TANDEM_EINVAL, "session: n_seq %d out of range [1, 4096]", p->n_seq);
    if (n_ctx < 1 || n_ctx > (1 << 24))
        return td_err(err, errlen, TANDEM_EINVAL, "session: n_ctx %d out of range", n_ctx);
    if (p->n_batch < 1 || p->n_batch > 65536)
        return td_err(err, errlen, TANDEM_EINVAL, "session: n_batch %d out of range [1, 65536]", p->n_batch);
    int n_out = p->n_outputs;
    if (n_out <= 0) {
        int64_t cap = (256ll << 20) / ((int64_t)d->n_vocab * 4);
        n_out = p->n_batch < cap ? p->n_batch : (int)(cap > p->n_seq ? cap : p->n_seq);
    }
    if (n_out > p->n_batch)
        n_out = p->n_batch;
    int prc = plan_check_session(e, p, err, errlen); /* before the first big allocation (runtime/plan.h) */
    if (prc)
        return prc;

    tandem_session *s = calloc(1, sizeof *s);
    if (!s)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    s->e = e;
    s->n_seq = p->n_seq;
    s->n_ctx = n_ctx;
    s->n_batch = p->n_batch;
    s->n_outputs = n_out;
    const int64_t B = p->n_batch, D = d->d_model, E = d->n_expert, K = d->n_expert_used;
    session_dims dm;
    session_dims_of(d, &dm);
    const int64_t qdim = dm.q, kvdim = dm.kv, attdim = dm.att, ff = dm.ff;
    int threads = pool_size(e->pool);
    s->attn_scratch_stride = attn_scratch_floats(n_ctx, d->attn == ATTN_MLA ? d->kv_lora_rank : 0,
                                                 d->attn == ATTN_GQA ? d->head_dim : 0);
    s->len = calloc((size_t)s->n_seq, sizeof *s->len);
    s->kv = calloc((size_t)d->n_layer, sizeof *s->kv);
    s->x = td_alloc((size_t)(B * D) * 4);
    s->h = td_alloc((size_t)(B * D) * 4);
    s->q = td_alloc((size_t)(B * qdim) * 4);
    s->kvbuf = td_alloc((size_t)(B * kvdim) * 4);
    s->att = td_alloc((size_t)(B * attdim) * 4);
    s->ff1 = td_alloc((size_t)(B * ff) * 4);
    s->ff2 = td_alloc((size_t)(B * ff) * 4);
    s->y = td_alloc((size_t)(B * D) * 4);
    s->rope_cs = td_alloc((size_t)(B * max64(d->rope_dim, 2)) * 4);
    s->tok_seq = td_alloc((size_t)B * 4);
    s->tok_pos = td_alloc((size_t)B * 4);
    s->ids = td_alloc((size_t)(B * K) * 4);
    s->wts = td_alloc((size_t)(B * K) * 4);
    s->router_logits = td_alloc((size_t)(B * E) * 4);
    s->route_scratch = td_alloc((size_t)(3 * E) * 4);
    s->exp_count = td_alloc((size_t)E * 4);
    s->exp_tok = td_alloc((size_t)(E * B) * 4);
    s->exp_w = td_alloc((size_t)(E * B) * 4);
    s->gx = td_alloc((size_t)(B * D) * 4);
    s->gg = td_alloc((size_t)(B * d->d_ff_expert) * 4);
    s->gu = td_alloc((size_t)(B * d->d_ff_expert) * 4);
    s->gy = td_alloc((size_t)(B * D) * 4);
    s->attn_scratch = td_alloc((size_t)(threads * s->attn_scratch_stride) * 4);
    s->logits = td_alloc((size_t)((int64_t)n_out * d->n_vocab) * 4);
    s->logits_row = td_alloc((size_t)D * 4);
    int oom = !s->len || !s->kv || !s->x || !s->h || !s->q || !s->kvbuf || !s->att || !s->ff1 || !s->ff2 || !s->y ||
              !s->rope_cs || !s->tok_seq || !s->tok_pos || !s->ids || !s->wts || !s->router_logits ||
              !s->route_scratch || !s->exp_count || !s->exp_tok || !s->exp_w || !s->gx || !s->gg || !s->gu ||
              !s->gy || !s->attn_scratch || !s->logits || !s->logits_row;
    if (oom) {
        tandem_session_free(s);
        return td_err(err, errlen, TANDEM_ENOMEM, "session: out of memory for a batch of %d", p->n_batch);
    }
    int rc = hybrid_session_create(s, err, errlen);
    if (rc) {
        tandem_session_free(s);
        return rc;
    }
    /* CPU runs: the MoE operator's scratch; the KV cache lives here unless on the GPU */
    for (int l = 0; !rc && e->moe && !s->moe_s && l < d->n_layer; l++)
        if (e->moe[l])
            rc = moe_scratch_create(e->moe[l], p->n_batch, (int)K, &s->moe_s, err, errlen);
    if (rc) {
        tandem_session_free(s);
        return rc;
    }
    for (int l = 0; !oom && !s->hys && l < d->n_layer; l++) {
        int64_t cells = (int64_t)s->n_seq * n_ctx;
        kv_layer *kv = &s->kv[l];
        if (d->layer_linear && d->layer_linear[l])
            continue; /* a linear-attention layer keeps a state instead (forward_gdn.c) */
        if (d->attn == ATTN_GQA) {
            int64_t row = (int64_t)d->n_kv_head * d->head_dim;
            kv->k = td_alloc((size_t)(cells * row) * 4);
            kv->v = td_alloc((size_t)(cells * row) * 4);
            oom = !kv->k || !kv->v;
        } else {
            kv->ckv = td_alloc((size_t)(cells * d->kv_lora_rank) * 4);
            kv->kpe = td_alloc((size_t)(cells * d->qk_rope_dim) * 4);
            oom = !kv->ckv || !kv->kpe;
        }
    }
    if (oom) {
        tandem_session_free(s);
        return td_err(err, errlen, TANDEM_ENOMEM,
                      "session: out of memory for %d sequence(s) x %d tokens of KV cache and a batch of %d", p->n_seq,
                      n_ctx, p->n_batch);
    }
    if (!s->hys && ((rc = dsa_session_create(s, err, errlen)) != 0 || /* DSA's indexer cache (forward_dsa.c) */
                    (rc = gdn_session_create(s, err, errlen)) != 0 ||  /* linear-attention state (forward_gdn.c) */
                    (rc = oss_session_create(s, err, errlen)) != 0)) { /* gpt-oss's expert scratch */
        tandem_session_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int64_t session_host_bytes(const tandem_session *s)
{
    /* malloc_usable_size: what the allocator really gave, padding included */
    const void *bufs[] = { s->x, s->h, s->q, s->kvbuf, s->att, s->ff1, s->ff2, s->y, s->rope_cs, s->tok_seq,
                           s->tok_pos, s->ids, s->wts, s->router_logits, s->route_scratch, s->exp_count, s->exp_tok,
                           s->exp_w, s->gx, s->gg, s->gu, s->gy, s->attn_scratch, s->logits, s->logits_row };
    int64_t n = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        n += bufs[i] ? (int64_t)malloc_usable_size((void *)bufs[i]) : 0;
    for (int l = 0; s->kv && l < s->e->d.n_layer; l++) {
        const void *kv[] = { s->kv[l].k, s->kv[l].v, s->kv[l].ckv, s->kv[l].kpe };
        for (int i = 0; i < 4; i++)
            n += kv[i] ? (int64_t)malloc_usable_size((void *)kv[i]) : 0;
    }
    return n + dsa_session_bytes(s) + gdn_session_bytes(s);
}

int tandem_kv_len(const tandem_session *s, int seq)
{
    if (seq < 0 || seq >= s->n_seq)
        return TANDEM_EINVAL;
    return s->len[seq];
}

int tandem_kv_clear(tandem_session *s, int seq)
{
    return tandem_kv_truncate(s, seq, 0);
}

int tandem_kv_truncate(tandem_session *s, int seq, int len)
{
    if (seq < 0 || seq >= s->n_seq || len < 0)
        return TANDEM_EINVAL;
    if (len < s->len[seq])
        s->len[seq] = len;
    return 0;
}

const float *tandem_logits(const tandem_session *s, int i)
{
    if (i < 0 || i >= s->n_logits)
        return NULL;
    return s->logits + (int64_t)i * s->e->d.n_vocab;
}

int tandem_forward(tandem_session *s, const tandem_batch *b, char *err, size_t errlen)
{
    if (!s || !b)
        return td_err(err, errlen, TANDEM_EINVAL, "forward: no session or batch");
    if (s->hys)
        return hybrid_forward(s, b, err, errlen);
    return forward_batch(s, b, err, errlen);
}
