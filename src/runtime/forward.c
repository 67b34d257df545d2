/*
 * forward.c - one batched forward pass on the CPU.
 *
 * For a batch of T tokens (any mix of sequences):
 *   x = embed(tokens)
 *   per layer: x += attn(norm(x));  x += ffn(norm(x))
 *   logits = lm_head(norm(x)) for the wanted tokens
 * where attn is GQA or MLA over the session's KV cache and ffn is a dense
 * SwiGLU or a routed MoE (plus shared experts). All buffers come from the
 * session; the batch is validated completely before any state changes, so a
 * rejected batch leaves the KV cache as it was.
 *
 * Expert deferral (DESIGN.md section 1; engine parameter defer_experts = d,
 * d = 0 is exact and runs the code below unchanged). A MoE layer l whose
 * next layer is also MoE defers, per token, the d of its k routed experts
 * with the lowest router weight (ties: the later choice is deferred): their
 * output R_def_l(h_l) is added to the residual after layer l+1's MoE, not
 * before layer l+1's attention, i.e. O_l = I_l + S_l(I_l) + R_imm_l(I_l) +
 * R_def_{l-1}(I_{l-1}). The hybrid schedule computes the same thing with the
 * deferred experts running on the CPU during the next layer's attention. Where
 * the state lives between the two layers (no session field is spent on it):
 * the deferred ids in router_logits (free once routing is done, E >= k), the
 * deferred output in gx (the gather buffer of the reference expert loop,
 * which then runs token by token instead).
 */
#include "core/err.h"
#include "cpu/attn.h"
#include "cpu/moe/moe.h"
#include "cpu/router.h"
#include "runtime/engine.h"
#include "runtime/forward_dsa.h"
#include "runtime/forward_gdn.h"
#include "runtime/forward_oss.h"

#include <math.h>
#include <string.h>

static int validate(tandem_session *s, const tandem_batch *b, int *n_want, char *err, size_t errlen)
{
    const model_desc *d = &s->e->d;
    int T = b->n_tokens;
    if (T < 1 || T > s->n_batch)
        return td_err(err, errlen, TANDEM_EINVAL, "batch: %d tokens, the session takes 1 to %d per forward", T,
                      s->n_batch);
    if (!b->token || !b->pos)
        return td_err(err, errlen, TANDEM_EINVAL, "batch: token and pos arrays are required");
    int32_t *next = s->tok_seq; /* per-sequence running length, borrowed */
    int want = 0;
    for (int t = 0; t < T; t++) {
        int seq = b->seq ? b->seq[t] : 0;
        if (seq < 0 || seq >= s->n_seq)
            return td_err(err, errlen, TANDEM_EINVAL, "batch: token %d has sequence id %d, the session has %d", t,
                          seq, s->n_seq);
        if (b->token[t] < 0 || b->token[t] >= d->n_vocab)
            return td_err(err, errlen, TANDEM_EINVAL, "batch: token %d has id %d, outside the vocabulary of %d", t,
                          b->token[t], d->n_vocab);
        want += b->want ? b->want[t] != 0 : t == T - 1;
    }
    /* positions: each sequence continues where its cache ends */
    for (int t = 0; t < T; t++) {
        int seq = b->seq ? b->seq[t] : 0, expect = s->len[seq];
        for (int u = 0; u < t; u++)
            expect += (b->seq ? b->seq[u] : 0) == seq;
        if (b->pos[t] != expect)
            return td_err(err, errlen, TANDEM_EINVAL,
                          "batch: token %d of sequence %d has position %d, expected %d (the next free position)", t,
                          seq, b->pos[t], expect);
        if (expect >= s->n_ctx)
            return td_err(err, errlen, TANDEM_EFULL, "sequence %d is full: its context holds %d tokens", seq,
                          s->n_ctx);
        next[t] = seq;
    }
    if (want > s->n_outputs)
        return td_err(err, errlen, TANDEM_EFULL, "batch: logits wanted for %d tokens, the session keeps at most %d",
                      want, s->n_outputs);
    int dfr = s->e->params.defer_experts;
    if (dfr < 0 || (d->n_layer_moe > 0 && dfr >= d->n_expert_used))
        return td_err(err, errlen, TANDEM_EINVAL, "defer_experts %d: expected 0 to %d (experts per token - 1)", dfr,
                      d->n_layer_moe > 0 ? d->n_expert_used - 1 : 0);
    *n_want = want;
    return 0;
}

/* cos/sin of every token's position: rope_cs[t] = [cos(half) | sin(half)] */
static void rope_table(tandem_session *s, int T)
{
    const tandem_engine *e = s->e;
    int half = e->d.rope_dim / 2;
    for (int t = 0; t < T; t++) {
        float *cs = s->rope_cs + (int64_t)t * 2 * half;
        for (int i = 0; i < half; i++) {
            /* the angle is formed in fp32, as transformers does */
            float ang = (float)s->tok_pos[t] * e->rope_inv_freq[i];
            cs[i] = (float)cos((double)ang) * e->d.rope_scale;
            cs[half + i] = (float)sin((double)ang) * e->d.rope_scale;
        }
    }
}

/* q/k norms, rope, and the store of k and v into the cache, for tokens [b, e) */
typedef struct {
    tandem_session *s;
    const layer_weights *L;
    kv_layer *kv;
} qk_prep_ctx;

static void qk_prep_job(void *arg, int64_t b, int64_t e)
{
    const qk_prep_ctx *c = arg;
    tandem_session *s = c->s;
    const model_desc *d = &s->e->d;
    const layer_weights *L = c->L;
    const int hd = d->head_dim, H = d->n_head, KH = d->n_kv_head, half = d->rope_dim / 2;
    const int64_t qd = (int64_t)H * hd, kd = (int64_t)KH * hd;
    for (int64_t t = b; t < e; t++) {
        const float *cs = s->rope_cs + t * 2 * half;
        float *q = s->q + t * qd, *k = s->kvbuf + t * 2 * kd, *v = k + kd;
        for (int h = 0; h < H; h++) {
            if (L->q_norm)
                op_rmsnorm(q + h * hd, q + h * hd, L->q_norm, hd, d->rms_eps);
            op_rope(q + h * hd, d->rope_dim, d->rope == ROPE_PAIRS, cs, cs + half);
        }
        for (int h = 0; h < KH; h++) {
            if (L->k_norm)
                op_rmsnorm(k + h * hd, k + h * hd, L->k_norm, hd, d->rms_eps);
            op_rope(k + h * hd, d->rope_dim, d->rope == ROPE_PAIRS, cs, cs + half);
        }
        int64_t cell = (int64_t)s->tok_seq[t] * s->n_ctx + s->tok_pos[t];
        memcpy(c->kv->k + cell * kd, k, (size_t)kd * 4);
        memcpy(c->kv->v + cell * kd, v, (size_t)kd * 4);
    }
}

static void attention_gqa(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int hd = d->head_dim, H = d->n_head, KH = d->n_kv_head;
    const int64_t D = d->d_model, qd = (int64_t)H * hd, kd = (int64_t)KH * hd;
    kv_layer *kv = &s->kv[l];
    op_matmul(e->pool, s->q, qd, s->h, D, T, &L->q, L->q_bias);
    op_matmul(e->pool, s->kvbuf, 2 * kd, s->h, D, T, &L->k, L->k_bias);
    op_matmul(e->pool, s->kvbuf + kd, 2 * kd, s->h, D, T, &L->v, L->v_bias);
    qk_prep_ctx c = { s, L, kv };
    if (T >= 8) /* a long prompt's q/k norms and rotations are worth the pool */
        pool_run(e->pool, T, 0, qk_prep_job, &c);
    else
        qk_prep_job(&c, 0, T);
    attn_gqa_params a = { H, KH, hd, d->attn_scale, d->sliding_window, kv->k, kv->v, (int64_t)s->n_ctx * kd, kd };
    attn_gqa(e->pool, &a, T, s->q, s->tok_seq, s->tok_pos, s->att, s->attn_scratch, s->attn_scratch_stride);
    op_matmul(e->pool, s->y, D, s->att, qd, T, &L->o, L->o_bias);
}

/* DeepSeek's q_a_layernorm and kv_a_layernorm are built with the RMSNorm
 * default eps, not the config's rms_norm_eps. */
#define MLA_NORM_EPS 1e-6f

static void attention_mla(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int H = d->n_head, R = d->kv_lora_rank, rope = d->qk_rope_dim, nope = d->qk_nope_dim;
    const int qk = nope + rope, half = rope / 2;
    const int64_t D = d->d_model, qd = (int64_t)H * qk, kvd = R + rope + d->q_lora_rank;
    kv_layer *kv = &s->kv[l];
    if (d->q_lora_rank) {
        float *qa = s->kvbuf + R + rope;
        op_matmul(e->pool, qa, kvd, s->h, D, T, &L->q_a, NULL);
        op_rmsnorm_rows(e->pool, qa, kvd, qa, kvd, T, L->q_a_norm, d->q_lora_rank, MLA_NORM_EPS);
        op_matmul(e->pool, s->q, qd, qa, kvd, T, &L->q_b, NULL);
    } else {
        op_matmul(e->pool, s->q, qd, s->h, D, T, &L->q, NULL);
    }
    op_matmul(e->pool, s->kvbuf, kvd, s->h, D, T, &L->kv_a, NULL);
    for (int t = 0; t < T; t++) {
        const float *cs = s->rope_cs + (int64_t)t * 2 * half;
        float *c = s->kvbuf + t * kvd, *q = s->q + t * qd;
        int64_t cell = (int64_t)s->tok_seq[t] * s->n_ctx + s->tok_pos[t];
        op_rmsnorm(kv->ckv + cell * R, c, L->kv_a_norm, R, MLA_NORM_EPS);
        op_rope(c + R, rope, d->rope == ROPE_PAIRS, cs, cs + half);
        memcpy(kv->kpe + cell * rope, c + R, (size_t)rope * 4);
        for (int h = 0; h < H; h++)
            op_rope(q + h * qk + nope, rope, d->rope == ROPE_PAIRS, cs, cs + half);
    }
    attn_mla_params a = { H, nope, rope, d->v_head_dim, R, d->attn_scale, kv->ckv, kv->kpe,
                          (int64_t)s->n_ctx * R, (int64_t)s->n_ctx * rope, &L->kv_b };
    if (d->dsa) /* sparse attention over the indexer's selection (forward_dsa.c) */
        dsa_attention(s, l, T, &a, s->kvbuf + R + rope, kvd);
    else
        attn_mla(e->pool, &a, T, s->q, s->tok_seq, s->tok_pos, s->att, s->attn_scratch, s->attn_scratch_stride);
    op_matmul(e->pool, s->y, D, s->att, (int64_t)H * d->v_head_dim, T, &L->o, NULL);
}

/* y[T][D] = SwiGLU MLP of h; uses ff1/ff2 as scratch. */
static void mlp(tandem_session *s, int T, int64_t F, const mat *g, const mat *u, const mat *dn, const float *gb,
                const float *ub, const float *db, float *y)
{
    pool *p = s->e->pool;
    const int64_t D = s->e->d.d_model;
    op_matmul(p, s->ff1, F, s->h, D, T, g, gb);
    op_matmul(p, s->ff2, F, s->h, D, T, u, ub);
    op_silu_mul(s->ff1, s->ff2, (int64_t)T * F);
    op_matmul(p, y, D, s->ff1, F, T, dn, db);
}

static void reference_experts(tandem_session *s, int l, int T);
static void reference_experts_rows(tandem_session *s, int l, int T, const int32_t *ids, float *out);
static void shared_experts(tandem_session *s, int l, int T);

/* Layer l defers experts (see the top of the file). */
static int defers(const tandem_engine *e, int l)
{
    const model_desc *d = &e->d;
    return e->params.defer_experts > 0 && d->layer_moe[l] && l + 1 < d->n_layer && d->layer_moe[l + 1];
}

/* Per token, move the d experts of lowest weight from ids[t] to def[t]
 * (ties: the later of equal weights is deferred); -1 fills the gaps. */
static void defer_split(int T, int K, int dfr, int32_t *ids, const float *w, int32_t *def)
{
    for (int t = 0; t < T; t++) {
        const float *wt = w + (int64_t)t * K;
        int32_t *it = ids + (int64_t)t * K, *dt = def + (int64_t)t * K;
        for (int k = 0; k < K; k++) {
            int rank = 0;
            for (int j = 0; j < K; j++)
                rank += wt[j] > wt[k] || (wt[j] == wt[k] && j < k);
            dt[k] = -1;
            if (rank >= K - dfr) {
                dt[k] = it[k];
                it[k] = -1;
            }
        }
    }
}

/* y = the layer's routed experts (the immediate ones when it defers) and
 * shared experts of h. A deferring layer leaves its deferred ids in
 * router_logits for moe_deferred(). */
static void moe(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int E = d->n_expert, K = d->n_expert_used;
    const int64_t D = d->d_model;
    op_matmul(e->pool, s->router_logits, E, s->h, D, T, &L->router, NULL);
    route_params rp = { d->route, E, K, d->norm_topk, d->route_scale, d->n_group, d->topk_group, L->router_bias };
    for (int t = 0; t < T; t++)
        route_select(&rp, s->router_logits + (int64_t)t * E, s->ids + t * K, s->wts + t * K, s->route_scratch);
    if (s->route_counts) /* tandem_count_routes: before deferral splits the ids */
        for (int i = 0; i < T * K; i++)
            if (s->ids[i] >= 0)
                s->route_counts[(int64_t)l * E + s->ids[i]]++;
    const int dfr = defers(e, l);
    if (dfr)
        defer_split(T, K, e->params.defer_experts, s->ids, s->wts, (int32_t *)s->router_logits);
    if (e->moe && e->moe[l]) {
        int rc = moe_forward(e->moe[l], s->moe_s, e->pool, T, K, s->h, s->ids, s->wts, s->y);
        TD_ASSERT(rc == 0); /* ids come from the router: always in range and held */
    } else if (e->params.defer_experts > 0) {
        reference_experts_rows(s, l, T, s->ids, s->y); /* gx may hold a deferred output */
    } else {
        reference_experts(s, l, T);
    }
    shared_experts(s, l, T);
}

/* gx = the deferred experts of layer l (ids left in router_logits by moe()). */
static void moe_deferred(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const int K = e->d.n_expert_used;
    const int32_t *def = (const int32_t *)s->router_logits;
    if (e->moe && e->moe[l]) {
        int rc = moe_forward(e->moe[l], s->moe_s, e->pool, T, K, s->h, def, s->wts, s->gx);
        TD_ASSERT(rc == 0);
    } else {
        reference_experts_rows(s, l, T, def, s->gx);
    }
}

/* The exact path (TANDEM_FMT_F32): experts one by one over the checkpoint's
 * weights with fp32 activations, through the dense matmul. */
static void reference_experts(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int E = d->n_expert, K = d->n_expert_used;
    const int64_t D = d->d_model, F = d->d_ff_expert;
    memset(s->exp_count, 0, (size_t)E * 4);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int ex = s->ids[t * K + k], n = s->exp_count[ex]++;
            s->exp_tok[(int64_t)ex * s->n_batch + n] = t;
            s->exp_w[(int64_t)ex * s->n_batch + n] = s->wts[t * K + k];
        }
    memset(s->y, 0, (size_t)(T * D) * 4);
    for (int ex = 0; ex < E; ex++) {
        int n = s->exp_count[ex];
        if (!n)
            continue;
        const int32_t *tok = s->exp_tok + (int64_t)ex * s->n_batch;
        const float *w = s->exp_w + (int64_t)ex * s->n_batch;
        for (int i = 0; i < n; i++)
            memcpy(s->gx + i * D, s->h + tok[i] * D, (size_t)D * 4);
        op_matmul(e->pool, s->gg, F, s->gx, D, n, &L->exp_gate[ex], NULL);
        op_matmul(e->pool, s->gu, F, s->gx, D, n, &L->exp_up[ex], NULL);
        op_silu_mul(s->gg, s->gu, n * F);
        op_matmul(e->pool, s->gy, D, s->gg, F, n, &L->exp_down[ex], NULL);
        for (int i = 0; i < n; i++) {
            float *yt = s->y + tok[i] * D;
            const float *gy = s->gy + i * D;
            for (int64_t j = 0; j < D; j++)
                yt[j] += w[i] * gy[j];
        }
    }
}

/* The same maths token by token, for any id list (ids < 0 skipped), without
 * the gather buffer gx: out[t] = sum_k w[t][k] * expert_ids[t][k](h[t]). */
static void reference_experts_rows(tandem_session *s, int l, int T, const int32_t *ids, float *out)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int K = d->n_expert_used;
    const int64_t D = d->d_model, F = d->d_ff_expert;
    memset(out, 0, (size_t)(T * D) * 4);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int ex = ids[t * K + k];
            if (ex < 0)
                continue;
            const float *h = s->h + t * D, w = s->wts[t * K + k];
            op_matmul(e->pool, s->gg, F, h, D, 1, &L->exp_gate[ex], NULL);
            op_matmul(e->pool, s->gu, F, h, D, 1, &L->exp_up[ex], NULL);
            op_silu_mul(s->gg, s->gu, F);
            op_matmul(e->pool, s->gy, D, s->gg, F, 1, &L->exp_down[ex], NULL);
            float *yt = out + t * D;
            for (int64_t j = 0; j < D; j++)
                yt[j] += w * s->gy[j];
        }
}

static void shared_experts(tandem_session *s, int l, int T)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int64_t D = d->d_model;
    if (d->d_ff_shared) {
        mlp(s, T, d->d_ff_shared, &L->sh_gate, &L->sh_up, &L->sh_down, L->sh_gate_bias, L->sh_up_bias,
            L->sh_down_bias, s->gy);
        for (int t = 0; t < T; t++) {
            float gate = 1.0f;
            if (d->shared_gate) {
                float z;
                op_matmul(e->pool, &z, 1, s->h + t * D, D, 1, &L->sh_gate_inp, NULL);
                gate = 1.0f / (1.0f + expf(-z));
            }
            float *yt = s->y + t * D;
            const float *z = s->gy + t * D;
            for (int64_t j = 0; j < D; j++)
                yt[j] += gate * z[j];
        }
    }
}

static void add_rows(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
}

int forward_batch(tandem_session *s, const tandem_batch *b, char *err, size_t errlen)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    int n_want = 0, rc = validate(s, b, &n_want, err, errlen);
    if (rc)
        return rc;
    if (s->gdn && (rc = gdn_begin(s, b, err, errlen)) != 0) /* linear-attention state (forward_gdn.c) */
        return rc;
    const int T = b->n_tokens;
    const int64_t D = d->d_model;
    for (int t = 0; t < T; t++)
        s->tok_pos[t] = b->pos[t]; /* tok_seq was filled by validate */
    rope_table(s, T);
    for (int t = 0; t < T; t++)
        mat_row_f32(&e->embed, b->token[t], s->x + t * D);
    if (s->route_counts)
        s->routed_tokens += T;

    for (int l = 0; l < d->n_layer; l++) {
        const layer_weights *L = &e->layers[l];
        op_rmsnorm_rows(e->pool, s->h, D, s->x, D, T, L->attn_norm, (int)D, d->rms_eps);
        if (d->layer_linear && d->layer_linear[l])
            gdn_linear_attention(s, l, T);
        else if (d->attn_gate)
            gdn_gated_attention(s, l, T);
        else if (d->oss)
            oss_attention(s, l, T);
        else if (d->attn == ATTN_GQA)
            attention_gqa(s, l, T);
        else
            attention_mla(s, l, T);
        add_rows(s->x, s->y, T * D);
        op_rmsnorm_rows(e->pool, s->h, D, s->x, D, T, L->ffn_norm, (int)D, d->rms_eps);
        if (d->oss)
            oss_moe(s, l, T);
        else if (d->layer_moe[l])
            moe(s, l, T);
        else
            mlp(s, T, d->d_ff, &L->ffn_gate, &L->ffn_up, &L->ffn_down, L->ffn_gate_bias, L->ffn_up_bias,
                L->ffn_down_bias, s->y);
        add_rows(s->x, s->y, T * D);
        if (l > 0 && defers(e, l - 1))
            add_rows(s->x, s->gx, T * D); /* R_def_{l-1}(I_{l-1}) */
        if (defers(e, l))
            moe_deferred(s, l, T);
    }

    /* final norm of the wanted rows, gathered, then one lm_head matmul */
    int j = 0;
    for (int t = 0; t < T; t++) {
        int want = b->want ? b->want[t] != 0 : t == T - 1;
        if (want)
            op_rmsnorm(s->h + (j++) * D, s->x + t * D, e->out_norm, (int)D, d->rms_eps);
    }
    op_matmul(e->pool, s->logits, d->n_vocab, s->h, D, n_want, &e->lm_head, NULL);
    s->n_logits = n_want;
    for (int t = 0; t < T; t++)
        s->len[s->tok_seq[t]] = s->tok_pos[t] + 1;
    return 0;
}
