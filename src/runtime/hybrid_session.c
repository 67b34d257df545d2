/*
 * hybrid_session.c - a session on the GPU: KV cache and activations in GPU
 * memory, the forward schedule of DESIGN.md section 1, chunked prefill and
 * one CUDA graph per decode shape.
 *
 * A batch is cut into passes of at most `chunk` tokens, in order, so a long
 * prompt is prefilled in chunks: each pass stores its keys before attending,
 * so later tokens (of this pass or a later one) see earlier ones through the
 * cache. One pass (enqueue()):
 *   copy tok/pos/seq/wanted-rows from pinned memory; x = embed(tok);
 *   h = norm(x)
 *   per layer: x += o(attn(h))       (q|k|v GEMV, one q/k norm+rope+KV store
 *                                      kernel, attention, o GEMV adding to x)
 *     dense:  h = norm2(x); x += down(silu(gate h) * up h); h = next norm(x)
 *     MoE:    one gate kernel: h = norm2(x), ids, w = route(router h), and
 *             the slot in pinned memory (h, immediate and deferred CPU ids,
 *             w) plus the GPU-held experts' id lists
 *             hand-off: memop: the main stream writes go[l] and goes on;
 *                       host:  fork -> side stream: host function
 *             main stream: x += shared(h); x += GPU-held experts(h)
 *             memop: wait done[l]; host: join
 *             x += y (+ the previous layer's deferred y); h = next norm(x):
 *             one add+norm kernel reading the CPU's results from pinned memory
 *   logits = lm_head(norm(x[wanted rows])) -> the session's logits (pinned)
 * With stream memory operations nothing needs a second stream: the CPU works
 * while the main stream runs the shared and GPU-held experts, then the main
 * stream waits. With deferral (hybrid.h) the CPU computes layer l's deferred
 * experts after signalling done[l], during layer l + 1's attention; the
 * host-function hand-off puts them in a second host function on the side
 * stream after the join, so the same overlap happens there.
 * Small passes (T <= HY_GRAPH_MAX_T, one chunk) are captured once per
 * (T, wanted rows) as a CUDA graph and replayed: every input is read on the
 * device from fixed buffers, so a graph serves every later step of that
 * shape. A capture that fails turns graphs off for the session (warning) and
 * the pass runs eagerly.
 *
 * Errors: GPU errors are sticky in the context and reported after the pass;
 * a failed pass may have written KV entries of its tokens, but the session's
 * lengths only grow after success, so those cells are simply overwritten.
 */
#include "core/err.h"
#include "core/log.h"
#include "runtime/hybrid_impl.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* Passes of up to HY_CHUNK_DEFAULT tokens, or HY_CHUNK_STREAM where the
 * session streams experts: each streamed pass copies every MoE layer once,
 * so longer passes spread that copy over more tokens (Qwen3-30B-A3B on the
 * H200: 22 ms per layer for the copy against 59 ms of CPU at 2048 tokens). */
enum { HY_GRAPH_MAX_T = 64, HY_CHUNK_DEFAULT = 1024, HY_CHUNK_STREAM = 4096 };

/* DeepSeek builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps
 * (as forward.c does). */
#define HY_MLA_NORM_EPS 1e-6f

_Static_assert(GPU_ROUTE_SOFTMAX == (int)ROUTE_SOFTMAX && GPU_ROUTE_SOFTMAX_GROUP == (int)ROUTE_SOFTMAX_GROUP &&
                   GPU_ROUTE_SIGMOID_GROUP == (int)ROUTE_SIGMOID_GROUP,
               "gpu.h routing kinds follow model.h");
_Static_assert((int)MOE_BF16 == TANDEM_FMT_BF16 && (int)MOE_INT8 == TANDEM_FMT_INT8 &&
                   (int)MOE_INT4 == TANDEM_FMT_INT4,
               "moe.h formats follow tandem.h");

void hybrid_opts_default(hybrid_opts *o)
{
    memset(o, 0, sizeof *o);
    o->graphs = 1;
    o->handoff = HY_HANDOFF_MEMOP; /* host functions where the driver lacks memory operations */
    o->chunk = 0; /* HY_CHUNK_DEFAULT, or HY_CHUNK_STREAM for a session that streams */
    o->fast = 1;
    o->defer = -1;
    const char *v;
    if ((v = getenv("TANDEM_GPU_GRAPH")))
        o->graphs = atoi(v) != 0;
    if ((v = getenv("TANDEM_GPU_HANDOFF")))
        o->handoff = !strcmp(v, "host") ? HY_HANDOFF_HOST : HY_HANDOFF_MEMOP;
    if ((v = getenv("TANDEM_GPU_CHUNK")) && atoi(v) > 0)
        o->chunk = atoi(v);
    if ((v = getenv("TANDEM_GPU_EXACT")))
        o->exact = atoi(v) != 0;
    if ((v = getenv("TANDEM_GPU_FAST")))
        o->fast = atoi(v) != 0;
    o->stream_min = HY_STREAM_MIN_DEFAULT;
    if ((v = getenv("TANDEM_GPU_STREAM_MIN")) && atoi(v) >= 0)
        o->stream_min = atoi(v);
    o->stream_share = -1.0;
    if ((v = getenv("TANDEM_GPU_STREAM_SHARE")) && atof(v) > 0.0 && atof(v) <= 1.0)
        o->stream_share = atof(v);
}

/* ---- allocation ------------------------------------------------------------------- */
static void *dalloc(hybrid_session *hs, size_t bytes, char *err, size_t errlen)
{
    if (hs->n_bufs == hs->cap_bufs) {
        int cap = hs->cap_bufs ? 2 * hs->cap_bufs : 64;
        void **nb = realloc(hs->bufs, (size_t)cap * sizeof *nb);
        if (!nb) {
            td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
            return NULL;
        }
        hs->bufs = nb;
        hs->cap_bufs = cap;
    }
    void *p;
    if (gpu_alloc(&p, bytes, err, errlen))
        return NULL;
    hs->bufs[hs->n_bufs++] = p;
    return p;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

void hybrid_session_free(tandem_session *s)
{
    if (!s || !s->hys)
        return;
    hybrid_session *hs = s->hys;
    if (hs->c)
        gpu_sync(hs->c, NULL, 0);
    hy_cpu_free(hs);
    hy_stream_free(hs);
    for (int i = 0; i < hs->n_graphs; i++)
        gpu_graph_free(hs->graphs[i].g);
    gpu_ctx_free(hs->c);
    for (int i = 0; i < hs->n_bufs; i++)
        gpu_free(hs->bufs[i]);
    free(hs->bufs);
    free(hs->k);
    free(hs->v);
    free(hs->ckv);
    free(hs->kpe);
    free(hs->defers);
    void *pinned[] = { hs->tok_h,           hs->pos_h,           hs->seq_h,       hs->rows_h,      hs->slot_x[0],
                       hs->slot_x[1],       hs->slot_ids[0],     hs->slot_ids[1], hs->slot_ids_def[0],
                       hs->slot_ids_def[1], hs->slot_w[0],       hs->slot_w[1],   hs->slot_y,      hs->slot_ydef[0],
                       hs->slot_ydef[1],    hs->flags,           hs->logits_h };
    for (size_t i = 0; i < sizeof pinned / sizeof pinned[0]; i++)
        gpu_host_free(pinned[i]);
    if (hs->logits_pinned)
        gpu_host_unregister(s->logits);
    free(hs);
    s->hys = NULL;
}

int hybrid_session_create(tandem_session *s, char *err, size_t errlen)
{
    s->hys = NULL;
    if (!s->e->hy)
        return 0;
    hybrid_opts o;
    hybrid_opts_default(&o);
    return hybrid_session_create_opts(s, &o, err, errlen);
}

int hybrid_session_create_opts(tandem_session *s, const hybrid_opts *o, char *err, size_t errlen)
{
    tandem_engine *e = s->e;
    const model_desc *d = &e->d;
    s->hys = NULL;
    if (!e->hy)
        return td_err(err, errlen, TANDEM_EINVAL, "session: the engine has no GPU");
    int rc = gpu_use_device(e->hy->device, err, errlen);
    if (rc)
        return rc;
    const int defer = o->defer >= 0 ? o->defer : e->params.defer_experts;
    if (defer < 0 || (d->n_layer_moe > 0 && defer >= d->n_expert_used))
        return td_err(err, errlen, TANDEM_EINVAL, "defer_experts %d: expected 0 to %d (experts per token - 1)", defer,
                      d->n_layer_moe > 0 ? d->n_expert_used - 1 : 0);
    if (d->n_layer_moe > 0 && d->n_expert_used > 32)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "GPU session: %d experts per token; the hand-off supports at most 32 (not supported yet)",
                      d->n_expert_used);
    hybrid_session *hs = calloc(1, sizeof *hs);
    if (!hs)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    s->hys = hs;
    hs->s = s;
    hs->e = e;
    hs->hy = e->hy;
    hs->o = *o;
    if (hs->o.stream_min > 0 && !hy_stream_usable(hs))
        hs->o.stream_min = 0; /* decided first: a session that cannot stream sizes nothing for it */
    if (hs->o.handoff == HY_HANDOFF_MEMOP && !e->hy->info.mem_ops)
        hs->o.handoff = HY_HANDOFF_HOST; /* the driver has no stream memory operations */
    hs->defer = defer;
    hs->defers = calloc((size_t)d->n_layer, 1);
    if (!hs->defers) {
        free(hs);
        s->hys = NULL;
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    }
    for (int l = 0; l + 1 < d->n_layer; l++) {
        hs->defers[l] = defer > 0 && d->layer_moe[l] && d->layer_moe[l + 1];
        /* the next layer's hand-off is where the GPU waits for deferred CPU work */
        if (hs->defers[l] && hy_layer_has_cpu(e->hy, d, l) != hy_layer_has_cpu(e->hy, d, l + 1)) {
            free(hs->defers);
            free(hs);
            s->hys = NULL;
            return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                          "expert deferral with CPU experts in layer %d but not in layer %d is not supported yet", l,
                          l + 1);
        }
    }
    const int chunk = o->chunk > 0 ? o->chunk : hs->o.stream_min > 0 ? HY_CHUNK_STREAM : HY_CHUNK_DEFAULT;
    hs->chunk = chunk < s->n_batch ? chunk : s->n_batch;
    hs->n_out = s->n_outputs < hs->chunk ? s->n_outputs : hs->chunk;
    const int64_t C = hs->chunk, D = d->d_model, E = d->n_expert, K = d->n_expert_used, V = d->n_vocab;
    const int64_t H = d->n_head, cells = (int64_t)s->n_seq * s->n_ctx;
    int64_t qkvw, attw, kmax;
    if (d->attn == ATTN_GQA) {
        qkvw = (H + 2 * d->n_kv_head) * d->head_dim;
        attw = H * d->head_dim;
    } else {
        qkvw = d->q_lora_rank + d->kv_lora_rank + d->qk_rope_dim;
        attw = H * d->v_head_dim;
    }
    const int64_t F = max64(max64(d->d_ff, d->d_ff_shared), d->d_ff_expert);
    kmax = max64(max64(D, attw), max64(F, d->q_lora_rank));
    int64_t scratch = 0;
    if (d->attn == ATTN_MLA)
        scratch = 2 * C * H * d->kv_lora_rank;
    if (e->hy->plan.gpu_experts > 0 || hs->o.stream_min > 0)
        scratch = max64(scratch, gpu_moe_scratch_floats(C, K, d->n_expert, D, d->d_ff_expert));

    rc = gpu_ctx_create(&hs->c, (size_t)(C * kmax), err, errlen);
    if (!rc && o->exact)
        gpu_ctx_set_exact(hs->c, INT_MAX);
    if (!rc)
        gpu_ctx_set_fast(hs->c, o->fast);
    if (!rc && e->hy->plan.gpu_weights != TANDEM_GPUW_BF16) /* the prefill GEMMs' dequantised weight tiles */
        rc = gpu_ctx_reserve_dequant(hs->c, (size_t)GPU_DEQUANT_ELEMS, err, errlen);
    /* the KV cache: one block, per layer k|v (GQA) or ckv|kpe (MLA) */
    int64_t per_layer = d->attn == ATTN_GQA ? 2 * cells * d->n_kv_head * d->head_dim
                                            : cells * (d->kv_lora_rank + d->qk_rope_dim);
    hs->k = calloc((size_t)d->n_layer, sizeof(float *));
    hs->v = calloc((size_t)d->n_layer, sizeof(float *));
    hs->ckv = calloc((size_t)d->n_layer, sizeof(float *));
    hs->kpe = calloc((size_t)d->n_layer, sizeof(float *));
    if (!rc && (!hs->k || !hs->v || !hs->ckv || !hs->kpe))
        rc = td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    if (!rc && !(hs->kv = dalloc(hs, (size_t)(per_layer * d->n_layer) * 4, err, errlen)))
        rc = td_err_prefix(err, errlen, TANDEM_ENOMEM, "GPU KV cache (lower n_ctx or n_seq)");
    for (int l = 0; !rc && l < d->n_layer; l++) {
        float *base = hs->kv + per_layer * l;
        if (d->attn == ATTN_GQA) {
            hs->k[l] = base;
            hs->v[l] = base + per_layer / 2;
        } else {
            hs->ckv[l] = base;
            hs->kpe[l] = base + cells * d->kv_lora_rank;
        }
    }
    const int gpu_def = defer > 0 && (e->hy->plan.gpu_experts > 0 || hs->o.stream_min > 0);
    struct {
        void **p;
        int64_t bytes;
    } dev[] = {
        { (void **)&hs->x, C * D * 4 },         { (void **)&hs->h, C * D * 4 },
        { (void **)&hs->qkv, C * qkvw * 4 },    { (void **)&hs->q, d->attn == ATTN_MLA ? C * H * (d->qk_nope_dim + d->qk_rope_dim) * 4 : 4 },
        { (void **)&hs->att, C * attw * 4 },    { (void **)&hs->ff, C * 2 * F * 4 },
        { (void **)&hs->act, C * F * 4 },       { (void **)&hs->ysh, C * D * 4 },
        { (void **)&hs->rlog, C * E * 4 + 4 },
        { (void **)&hs->wts, C * K * 4 + 4 },   { (void **)&hs->shg, C * 4 },
        { (void **)&hs->xw, hs->n_out * D * 4 }, { (void **)&hs->logits, hs->n_out * V * 4 },
        { (void **)&hs->scratch, scratch * 4 + 4 }, { (void **)&hs->ids, C * K * 4 + 4 },
        { (void **)&hs->gids, C * K * 4 + 4 },  { (void **)&hs->gids_def, C * K * 4 + 4 },
        { (void **)&hs->ydg[0], gpu_def ? C * D * 4 : 4 }, { (void **)&hs->ydg[1], gpu_def ? C * D * 4 : 4 },
        { (void **)&hs->tok_d, C * 4 },         { (void **)&hs->pos_d, C * 4 },
        { (void **)&hs->seq_d, C * 4 },         { (void **)&hs->rows_d, C * 4 },
    };
    for (size_t i = 0; !rc && i < sizeof dev / sizeof dev[0]; i++)
        if (!(*dev[i].p = dalloc(hs, (size_t)dev[i].bytes, err, errlen)))
            rc = td_err_prefix(err, errlen, TANDEM_ENOMEM, "GPU activations (lower n_batch or TANDEM_GPU_CHUNK)");
    struct {
        void **p;
        int64_t bytes;
    } pin[] = {
        { (void **)&hs->tok_h, C * 4 },     { (void **)&hs->pos_h, C * 4 },     { (void **)&hs->seq_h, C * 4 },
        { (void **)&hs->rows_h, C * 4 },    { &hs->slot_x[0], C * D * 4 },      { &hs->slot_x[1], C * D * 4 },
        { (void **)&hs->slot_ids[0], C * K * 4 + 4 },     { (void **)&hs->slot_ids[1], C * K * 4 + 4 },
        { (void **)&hs->slot_ids_def[0], C * K * 4 + 4 }, { (void **)&hs->slot_ids_def[1], C * K * 4 + 4 },
        { (void **)&hs->slot_w[0], C * K * 4 + 4 },       { (void **)&hs->slot_w[1], C * K * 4 + 4 },
        { (void **)&hs->slot_y, C * D * 4 },
        { (void **)&hs->slot_ydef[0], defer > 0 ? C * D * 4 : 4 }, { (void **)&hs->slot_ydef[1], defer > 0 ? C * D * 4 : 4 },
        { (void **)&hs->flags, (int64_t)d->n_layer * 2 * 4 },
    };
    for (size_t i = 0; !rc && i < sizeof pin / sizeof pin[0]; i++)
        rc = gpu_host_alloc(pin[i].p, (size_t)pin[i].bytes, err, errlen);
    if (!rc) {
        size_t lb = (size_t)s->n_outputs * (size_t)V * 4;
        if (gpu_host_register(s->logits, lb, NULL, 0) == 0)
            hs->logits_pinned = 1;
        else
            rc = gpu_host_alloc((void **)&hs->logits_h, (size_t)hs->n_out * (size_t)V * 4, err, errlen);
    }
    if (!rc)
        rc = hy_cpu_init(hs, err, errlen);
    if (!rc)
        rc = hy_stream_init(hs, err, errlen);
    if (rc) {
        hybrid_session_free(s);
        return rc;
    }
    td_log(TD_LOG_INFO,
           "GPU session: KV cache %.2f GB for %d x %d tokens, passes of %d tokens, %s hand-off, graphs %s, "
           "%s kernels, expert deferral %d",
           per_layer * d->n_layer * 4 / 1e9, s->n_seq, s->n_ctx, hs->chunk,
           hs->o.handoff == HY_HANDOFF_MEMOP ? "stream-memory-op" : "host-function", o->graphs ? "on" : "off",
           o->fast ? "decode" : "first", defer);
    return 0;
}

void hybrid_session_set_opts(tandem_session *s, const hybrid_opts *o)
{
    hybrid_session *hs = s->hys;
    if (!hs)
        return;
    for (int i = 0; i < hs->n_graphs; i++)
        gpu_graph_free(hs->graphs[i].g);
    hs->n_graphs = 0;
    hs->o.graphs = o->graphs;
    hs->o.exact = o->exact;
    hs->o.fast = o->fast;
    hs->o.cpu_skip = o->cpu_skip;
    hs->o.no_handoff = o->no_handoff;
    gpu_ctx_set_exact(hs->c, o->exact ? INT_MAX : 16);
    gpu_ctx_set_fast(hs->c, o->fast);
}

/* ---- the schedule of one pass ---------------------------------------------------------- */
/* x += o(attention(h)) */
static void attn_gqa(hybrid_session *hs, int l, int T)
{
    gpu_ctx *c = hs->c;
    const tandem_session *s = hs->s;
    const model_desc *d = &hs->e->d;
    const hybrid_engine *hy = hs->hy;
    const hy_layer *L = &hy->L[l];
    const int H = d->n_head, KH = d->n_kv_head, hd = d->head_dim, D = d->d_model;
    const int64_t qd = (int64_t)H * hd, kd = (int64_t)KH * hd, W = qd + 2 * kd;
    const int64_t seq_stride = (int64_t)s->n_ctx * kd;
    gpu_matmul(c, hs->qkv, W, hs->h, D, T, &L->qkv, L->qkv_bias, 0);
    gpu_qkv_prep_args pa = { H,         KH,       hd,        L->q_norm,   L->k_norm, d->rms_eps, d->rope_dim,
                             d->rope == ROPE_PAIRS, hy->inv_freq, d->rope_scale, hs->k[l], hs->v[l], seq_stride, kd };
    gpu_qkv_prep(c, &pa, T, hs->qkv, W, hs->seq_d, hs->pos_d);
    gpu_gqa a = { H, KH, hd, d->attn_scale, d->sliding_window, hs->k[l], hs->v[l], seq_stride, kd };
    gpu_attn_gqa(c, &a, T, hs->qkv, W, hs->seq_d, hs->pos_d, hs->att, qd);
    gpu_matmul(c, hs->x, D, hs->att, qd, T, &L->o, L->o_bias, 1);
}

static void attn_mla(hybrid_session *hs, int l, int T)
{
    gpu_ctx *c = hs->c;
    const tandem_session *s = hs->s;
    const model_desc *d = &hs->e->d;
    const hybrid_engine *hy = hs->hy;
    const hy_layer *L = &hy->L[l];
    const int H = d->n_head, R = d->kv_lora_rank, rope = d->qk_rope_dim, nope = d->qk_nope_dim;
    const int rq = d->q_lora_rank, qk = nope + rope, D = d->d_model;
    const int64_t A = rq + R + rope, qd = (int64_t)H * qk;
    const int pairs = d->rope == ROPE_PAIRS;
    /* qkv = [q_a | ckv | k_pe] from one GEMM */
    gpu_matmul(c, hs->qkv, A, hs->h, D, T, &L->qkv_a, NULL, 0);
    if (rq) {
        gpu_rmsnorm(c, hs->qkv, hs->qkv, T, A, 1, 0, L->q_a_norm, rq, HY_MLA_NORM_EPS);
        gpu_matmul(c, hs->q, qd, hs->qkv, A, T, &L->q_b, NULL, 0);
    } else {
        gpu_matmul(c, hs->q, qd, hs->h, D, T, &L->q_b, NULL, 0);
    }
    float *ckv = hs->qkv + rq, *kpe = hs->qkv + rq + R;
    gpu_rmsnorm(c, ckv, ckv, T, A, 1, 0, L->kv_a_norm, R, HY_MLA_NORM_EPS);
    gpu_kv_store(c, hs->ckv[l], (int64_t)s->n_ctx * R, R, ckv, A, R, T, hs->seq_d, hs->pos_d);
    gpu_rope(c, kpe, T, A, 1, 0, 0, rope, pairs, hy->inv_freq, d->rope_scale, hs->pos_d);
    gpu_kv_store(c, hs->kpe[l], (int64_t)s->n_ctx * rope, rope, kpe, A, rope, T, hs->seq_d, hs->pos_d);
    gpu_rope(c, hs->q, T, qd, H, qk, nope, rope, pairs, hy->inv_freq, d->rope_scale, hs->pos_d);
    gpu_mla a = { H, nope, rope, d->v_head_dim, R, d->attn_scale, hs->ckv[l], hs->kpe[l],
                  (int64_t)s->n_ctx * R, (int64_t)s->n_ctx * rope, L->kv_b };
    gpu_attn_mla(c, &a, T, hs->q, qd, hs->seq_d, hs->pos_d, hs->att, (int64_t)H * d->v_head_dim, hs->scratch);
    gpu_matmul(c, hs->x, D, hs->att, (int64_t)H * d->v_head_dim, T, &L->o, NULL, 1);
}

/* x += down(silu(gate h) * up h) (+ biases); gated: x += sigmoid(gate_inp . h) * (...) */
static void mlp(hybrid_session *hs, int T, int F, const gpu_mat *gu, const float *gu_b, const gpu_mat *dn,
                const float *dn_b, const gpu_mat *gate_inp)
{
    gpu_ctx *c = hs->c;
    const int D = hs->e->d.d_model;
    gpu_matmul(c, hs->ff, 2 * F, hs->h, D, T, gu, gu_b, 0);
    gpu_silu_mul(c, hs->act, F, hs->ff, 2 * F, T, F);
    if (!gate_inp) {
        gpu_matmul(c, hs->x, D, hs->act, F, T, dn, dn_b, 1);
        return;
    }
    gpu_matmul(c, hs->ysh, D, hs->act, F, T, dn, dn_b, 0);
    gpu_matmul_exact(c, hs->shg, 1, hs->h, D, T, gate_inp, NULL, 0);
    gpu_add_rows(c, hs->x, D, hs->ysh, D, T, D, hs->shg);
}

/* The norm weights of what follows layer l: the next attention norm, or
 * none after the last layer (the output norm runs on the wanted rows). */
static const float *next_norm(const hybrid_session *hs, int l)
{
    return l + 1 < hs->e->d.n_layer ? hs->hy->L[l + 1].attn_norm : NULL;
}

/* The MoE half of layer l, ending with x complete and h = the next norm of x. */
static void moe_layer(hybrid_session *hs, int l, int T)
{
    gpu_ctx *c = hs->c;
    const model_desc *d = &hs->e->d;
    const hybrid_engine *hy = hs->hy;
    const hy_layer *L = &hy->L[l];
    const int D = d->d_model, E = d->n_expert, K = d->n_expert_used, p = l & 1;
    /* a streaming pass runs every layer that has CPU experts on the GPU, the previous one included; a split
     * pass streams some of them and hands the others to the CPU */
    const int split = hs->streaming && hs->stream_n < E;
    const int strm = hs->streaming && hy_layer_has_cpu(hy, d, l);
    const int cpu = hy_layer_has_cpu(hy, d, l) && !hs->o.no_handoff && (!strm || split);
    const int dfr = hs->defers[l], prev = l > 0 && hs->defers[l - 1];
    const int prev_strm = prev && hs->streaming && hy_layer_has_cpu(hy, d, l - 1);
    const int prev_cpu = prev && hy_layer_has_cpu(hy, d, l - 1) && !hs->o.no_handoff && (!prev_strm || split);
    gpu_handoff ho;
    memset(&ho, 0, sizeof ho);
    ho.defer = dfr ? hs->defer : 0;
    if (cpu) {
        /* h as bf16 for the MoE operator, fp32 for the reference loop */
        ho.host_x = hs->slot_x[p];
        ho.x_bf16 = !hy->cpu_ref;
        ho.host_ids = hs->slot_ids[p];
        ho.host_ids_def = dfr ? hs->slot_ids_def[p] : NULL;
        ho.host_w = hs->slot_w[p];
    }
    if (L->n_gpu_exp || strm) {
        ho.slot = strm ? hs->stream_slot : L->ex.slot; /* the host lists leave these out */
        ho.gpu_ids = hs->gids;
        ho.gpu_ids_def = dfr ? hs->gids_def : NULL;
    }
    gpu_route_params rp = { (int)d->route, E, K, d->norm_topk, d->route_scale, d->n_group, d->topk_group,
                            L->router_bias };
    gpu_moe_gate(c, T, D, hs->x, L->ffn_norm, d->rms_eps, hs->h, &L->router, &rp, hs->rlog, hs->ids, hs->wts, &ho);
    if (cpu) {
        if (hs->o.handoff == HY_HANDOFF_HOST) {
            gpu_fork(c);
            gpu_host_fn(c, GPU_SIDE, hy_cpu_layer, &hs->jobs[2 * l]);
        } else {
            gpu_flag_write(c, GPU_MAIN, &hs->flags[2 * l], 1);
        }
    }
    /* meanwhile on the main stream: shared experts, then the GPU-held experts */
    if (d->d_ff_shared)
        mlp(hs, T, d->d_ff_shared, &L->sh_gu, L->sh_gu_bias, &L->sh_down, L->sh_down_bias,
            d->shared_gate ? &L->sh_gate_inp : NULL);
    if (L->n_gpu_exp || strm) {
        gpu_experts sx;
        const gpu_experts *ex = &L->ex;
        if (strm) { /* all of the layer's experts, GPU-held ones included, from host memory */
            hy_stream_layer(hs, l, &sx);
            ex = &sx;
        }
        gpu_moe_experts(c, ex, T, K, hs->h, D, hs->gids, hs->wts, hs->x, D, hs->scratch);
        if (dfr) {
            gpu_zero(c, GPU_MAIN, hs->ydg[p], (size_t)T * D * 4);
            gpu_moe_experts(c, ex, T, K, hs->h, D, hs->gids_def, hs->wts, hs->ydg[p], D, hs->scratch);
        }
    }
    if (cpu) {
        if (hs->o.handoff == HY_HANDOFF_HOST) {
            gpu_join(c);
            if (dfr) /* after the join: the CPU's deferred work overlaps the next layer */
                gpu_host_fn(c, GPU_SIDE, hy_cpu_layer, &hs->jobs[2 * l + 1]);
        } else {
            gpu_flag_wait(c, GPU_MAIN, &hs->flags[2 * l + 1], 1);
            gpu_flag_write(c, GPU_MAIN, &hs->flags[2 * l + 1], 0);
        }
    }
    const int prev_gpu = prev && (hy->L[l - 1].n_gpu_exp || prev_strm);
    const float *nw = next_norm(hs, l);
    gpu_add_norm(c, hs->x, T, D, cpu ? hs->slot_y : NULL, prev_cpu ? hs->slot_ydef[p ^ 1] : NULL,
                 prev_gpu ? hs->ydg[p ^ 1] : NULL, D, nw, d->rms_eps, nw ? hs->h : NULL);
}

/* The whole pass, enqueued (or captured). dst: where the logits rows go. */
static void enqueue(hybrid_session *hs, int T, int n_want, float *dst)
{
    gpu_ctx *c = hs->c;
    const model_desc *d = &hs->e->d;
    const hybrid_engine *hy = hs->hy;
    const int D = d->d_model;
    gpu_copy(c, GPU_MAIN, hs->tok_d, hs->tok_h, (size_t)T * 4);
    gpu_copy(c, GPU_MAIN, hs->pos_d, hs->pos_h, (size_t)T * 4);
    gpu_copy(c, GPU_MAIN, hs->seq_d, hs->seq_h, (size_t)T * 4);
    if (n_want)
        gpu_copy(c, GPU_MAIN, hs->rows_d, hs->rows_h, (size_t)n_want * 4);
    gpu_embed(c, hs->x, &hy->embed, hs->tok_d, T);
    gpu_rmsnorm(c, hs->h, hs->x, T, D, 1, 0, hy->L[0].attn_norm, D, d->rms_eps);
    if (hs->streaming)
        hy_stream_begin(hs);
    for (int l = 0; l < d->n_layer; l++) {
        const hy_layer *L = &hy->L[l];
        if (d->attn == ATTN_GQA)
            attn_gqa(hs, l, T);
        else
            attn_mla(hs, l, T);
        if (d->layer_moe[l]) {
            moe_layer(hs, l, T);
        } else {
            gpu_rmsnorm(c, hs->h, hs->x, T, D, 1, 0, L->ffn_norm, D, d->rms_eps);
            mlp(hs, T, d->d_ff, &L->ffn_gu, L->ffn_gu_bias, &L->ffn_down, L->ffn_down_bias, NULL);
            if (next_norm(hs, l))
                gpu_rmsnorm(c, hs->h, hs->x, T, D, 1, 0, next_norm(hs, l), D, d->rms_eps);
        }
    }
    if (!n_want)
        return;
    gpu_gather_rows(c, hs->xw, D, hs->x, D, hs->rows_d, n_want, D);
    gpu_rmsnorm(c, hs->xw, hs->xw, n_want, D, 1, 0, hy->out_norm, D, d->rms_eps);
    gpu_matmul(c, hs->logits, d->n_vocab, hs->xw, D, n_want, &hy->lm_head, NULL, 0);
    gpu_copy(c, GPU_MAIN, dst, hs->logits, (size_t)n_want * d->n_vocab * 4);
}

static gpu_graph *graph_for(hybrid_session *hs, int T, int n_want, float *dst, char *err, size_t errlen)
{
    for (int i = 0; i < hs->n_graphs; i++)
        if (hs->graphs[i].T == T && hs->graphs[i].n_want == n_want)
            return hs->graphs[i].g;
    if (hs->n_graphs == HY_MAX_GRAPHS)
        return NULL;
    gpu_graph *g = NULL;
    if (gpu_capture_begin(hs->c) == 0) {
        enqueue(hs, T, n_want, dst);
        gpu_capture_end(hs->c, &g);
    }
    if (!g) {
        char msg[512];
        gpu_ctx_status(hs->c, msg, sizeof msg);
        td_log(TD_LOG_WARN, "CUDA graph capture failed (%s): running without graphs", msg);
        gpu_ctx_clear(hs->c);
        hs->o.graphs = 0;
        (void)err, (void)errlen;
        return NULL;
    }
    hs->graphs[hs->n_graphs].T = T;
    hs->graphs[hs->n_graphs].n_want = n_want;
    hs->graphs[hs->n_graphs].g = g;
    hs->n_graphs++;
    hs->st.captures++;
    return g;
}

static int run_pass(hybrid_session *hs, int T, int n_want, float *dst, int graphable, char *err, size_t errlen)
{
    hs->cur_T = T;
    hs->streaming = hy_stream_plan(hs, T);
    gpu_graph *g = NULL;
    if (graphable && hs->o.graphs && T <= HY_GRAPH_MAX_T && !hs->streaming)
        g = graph_for(hs, T, n_want, dst, err, errlen);
    /* the watcher waits for every CPU layer's flag; a streaming pass hands nothing to the CPU unless it splits */
    const int watch = !hs->o.no_handoff && (!hs->streaming || hs->stream_n < hs->e->d.n_expert);
    if (watch)
        hy_cpu_arm(hs);
    if (g) {
        gpu_graph_launch(hs->c, g);
        hs->st.graph_launches++;
    } else {
        enqueue(hs, T, n_want, dst);
    }
    int rc = gpu_sync(hs->c, err, errlen);
    if (watch)
        hy_cpu_disarm(hs, rc != 0);
    if (!rc && hs->cpu_rc) {
        rc = td_err(err, errlen, hs->cpu_rc, "%s", hs->cpu_msg);
        hs->cpu_rc = 0;
    }
    return rc;
}

/* ---- the batch ---------------------------------------------------------------------- */
/* As forward.c validates: ids and sequences in range, each sequence's
 * positions continue its cache, room in the context and the logits. */
static int validate(const tandem_session *s, const tandem_batch *b, int *n_want, char *err, size_t errlen)
{
    const model_desc *d = &s->e->d;
    const int T = b->n_tokens;
    if (T < 1 || T > s->n_batch)
        return td_err(err, errlen, TANDEM_EINVAL, "batch: %d tokens, the session takes 1 to %d per forward", T,
                      s->n_batch);
    if (!b->token || !b->pos)
        return td_err(err, errlen, TANDEM_EINVAL, "batch: token and pos arrays are required");
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
    }
    if (want > s->n_outputs)
        return td_err(err, errlen, TANDEM_EFULL, "batch: logits wanted for %d tokens, the session keeps at most %d",
                      want, s->n_outputs);
    *n_want = want;
    return 0;
}

int hybrid_forward(tandem_session *s, const tandem_batch *b, char *err, size_t errlen)
{
    hybrid_session *hs = s->hys;
    if (!hs)
        return td_err(err, errlen, TANDEM_EINVAL, "forward: the session has no GPU state");
    int n_want = 0, rc = validate(s, b, &n_want, err, errlen);
    if (rc)
        return rc;
    const int64_t t0 = hy_now_ns(), V = s->e->d.n_vocab;
    if ((rc = gpu_use_device(hs->hy->device, err, errlen)))
        return rc;
    const int T = b->n_tokens;
    int rows_done = 0;
    for (int start = 0; !rc && start < T; start += hs->chunk) {
        int n = T - start < hs->chunk ? T - start : hs->chunk, nw = 0;
        for (int i = 0; i < n; i++) {
            int t = start + i;
            hs->tok_h[i] = b->token[t];
            hs->pos_h[i] = b->pos[t];
            hs->seq_h[i] = b->seq ? b->seq[t] : 0;
            if (b->want ? b->want[t] != 0 : t == T - 1)
                hs->rows_h[nw++] = i;
        }
        float *dst = hs->logits_pinned ? s->logits + (int64_t)rows_done * V : hs->logits_h;
        rc = run_pass(hs, n, nw, dst, n == T, err, errlen);
        if (!rc && !hs->logits_pinned && nw)
            memcpy(s->logits + (int64_t)rows_done * V, hs->logits_h, (size_t)nw * V * 4);
        rows_done += nw;
    }
    if (rc)
        return rc;
    for (int t = 0; t < T; t++)
        s->len[b->seq ? b->seq[t] : 0] = b->pos[t] + 1;
    s->n_logits = n_want;
    hs->st.steps++;
    hs->st.wall_ns += hy_now_ns() - t0;
    return 0;
}

void hybrid_stats_get(const tandem_session *s, hybrid_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!s->hys)
        return;
    *out = s->hys->st;
    out->cpu_ns = atomic_load(&s->hys->cpu_ns);
    out->cpu_def_ns = atomic_load(&s->hys->cpu_def_ns);
}

void hybrid_stats_reset(tandem_session *s)
{
    if (!s->hys)
        return;
    memset(&s->hys->st, 0, sizeof s->hys->st);
    atomic_store(&s->hys->cpu_ns, 0);
    atomic_store(&s->hys->cpu_def_ns, 0);
}
