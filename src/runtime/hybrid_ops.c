/*
 * hybrid_ops.c - where the GPU time of a decode step goes (`tandem bench e2e
 * --ops`): each op of one layer on the session's real weights and buffers,
 * timed with device events over a CUDA graph of HO_REPS back-to-back
 * launches (so launch gaps count as they do inside the decode graph), for
 * the decode kernels and for the first kernels (gpu_ctx_set_fast(0)), plus
 * the device copy bandwidth as the ceiling and the node count of the
 * session's decode graph.
 *
 * Output, one line per op and kernel set (BENCH.md's key=value format):
 *   bench=gpu_op model=M op=qkv kernels=decode T=1 us=... MB=... GBps=... hbm_frac=...
 * MB counts the weight bytes an op must read (activations are small and
 * mostly L2 hits); hbm_frac = GBps / the measured copy bandwidth. The sum
 * of a layer's ops times the layer count, next to gpu_ms of the decode
 * line, says how much of a step is launch gaps and hand-off.
 *
 * It runs after the decode measurement of a session and leaves garbage in
 * that session's activations (not in its KV cache beyond what decode wrote),
 * so the session is freed right after.
 */
#include "core/err.h"
#include "core/log.h"
#include "cuda/gpu_quant.h"
#include "runtime/hybrid_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { HO_REPS = 50, HO_LAUNCHES = 5 };

typedef struct {
    hybrid_session *hs;
    int l, T;
} op_env;

typedef void (*op_fn)(const op_env *v);

/* the bytes a GEMV reads: weights and, quantised, their scales (gpu_quant.h) */
static int64_t mat_bytes(const gpu_mat *m)
{
    int64_t data, scales;
    gpu_wq_size(m->dt, m->rows, m->cols, m->group, &data, &scales);
    return data + scales;
}

/* ---- the ops of one GQA MoE layer, as hybrid_session.c enqueues them -------------- */
static void op_qkv(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    const hy_layer *L = &hs->hy->L[v->l];
    gpu_matmul(hs->c, hs->qkv, L->qkv.rows, hs->h, d->d_model, v->T, &L->qkv, L->qkv_bias, 0);
}

static void op_prep(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    const hy_layer *L = &hs->hy->L[v->l];
    const int64_t kd = (int64_t)d->n_kv_head * d->head_dim;
    gpu_qkv_prep_args pa = { d->n_head,      d->n_kv_head,  d->head_dim, L->q_norm, L->k_norm, d->rms_eps,
                             d->rope_dim,    d->rope == ROPE_PAIRS, hs->hy->inv_freq, d->rope_scale,
                             hs->k[v->l],    hs->v[v->l],   (int64_t)hs->s->n_ctx * kd, kd };
    gpu_qkv_prep(hs->c, &pa, v->T, hs->qkv, L->qkv.rows, hs->seq_d, hs->pos_d);
}

static void op_attn(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    const int64_t kd = (int64_t)d->n_kv_head * d->head_dim, qd = (int64_t)d->n_head * d->head_dim;
    gpu_gqa a = { d->n_head,   d->n_kv_head, d->head_dim, d->attn_scale, d->sliding_window, hs->k[v->l],
                  hs->v[v->l], (int64_t)hs->s->n_ctx * kd, kd };
    gpu_attn_gqa(hs->c, &a, v->T, hs->qkv, hs->hy->L[v->l].qkv.rows, hs->seq_d, hs->pos_d, hs->att, qd);
}

static void op_o(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    const hy_layer *L = &hs->hy->L[v->l];
    gpu_matmul(hs->c, hs->ysh, d->d_model, hs->att, L->o.cols, v->T, &L->o, L->o_bias, 0);
}

static void op_gate(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    const hy_layer *L = &hs->hy->L[v->l];
    gpu_handoff ho = { hs->slot_x[0], !hs->hy->cpu_ref, hs->slot_ids[0], NULL, hs->slot_w[0], NULL, NULL, NULL, 0 };
    gpu_route_params rp = { (int)d->route, d->n_expert, d->n_expert_used, d->norm_topk, d->route_scale,
                            d->n_group, d->topk_group, L->router_bias };
    gpu_moe_gate(hs->c, v->T, d->d_model, hs->x, L->ffn_norm, d->rms_eps, hs->h, &L->router, &rp, hs->rlog, hs->ids,
                 hs->wts, &ho);
}

static void op_add_norm(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    gpu_add_norm(hs->c, hs->ysh, v->T, d->d_model, hs->slot_y, NULL, NULL, d->d_model, hs->hy->L[v->l].attn_norm,
                 d->rms_eps, hs->h);
}

static void op_lm_head(const op_env *v)
{
    hybrid_session *hs = v->hs;
    const model_desc *d = &hs->e->d;
    gpu_matmul(hs->c, hs->logits, d->n_vocab, hs->xw, d->d_model, v->T < hs->n_out ? v->T : hs->n_out,
               &hs->hy->lm_head, NULL, 0);
}

/* Microseconds per op: HO_REPS launches captured in a graph, replayed (or
 * enqueued one by one where graphs are refused). */
static int time_op(hybrid_session *hs, op_fn fn, const op_env *v, gpu_timer *tm, double *us, char *err,
                   size_t errlen)
{
    gpu_graph *g = NULL;
    *us = 0;
    if (gpu_capture_begin(hs->c) == 0) {
        for (int r = 0; r < HO_REPS; r++)
            fn(v);
        gpu_capture_end(hs->c, &g);
    }
    if (!g)
        gpu_ctx_clear(hs->c); /* a failed capture leaves the context usable */
    int rc = 0;
    for (int i = 0; !rc && i < 2; i++) { /* warm-up */
        if (g)
            rc = gpu_graph_launch(hs->c, g);
        else
            fn(v);
    }
    if (!rc)
        rc = gpu_sync(hs->c, err, errlen);
    if (!rc)
        rc = gpu_timer_start(hs->c, tm);
    for (int i = 0; !rc && i < HO_LAUNCHES; i++) {
        if (g)
            rc = gpu_graph_launch(hs->c, g);
        else
            for (int r = 0; r < HO_REPS; r++)
                fn(v);
    }
    if (!rc)
        rc = gpu_timer_stop(hs->c, tm);
    double ms = 0;
    if (!rc)
        rc = gpu_timer_ms(hs->c, tm, &ms);
    if (rc)
        gpu_ctx_status(hs->c, err, errlen);
    gpu_graph_free(g);
    *us = ms * 1e3 / (HO_LAUNCHES * HO_REPS);
    return rc;
}

/* Device copy bandwidth (read + write bytes), GB/s. */
static double copy_gbps(gpu_ctx *c, gpu_timer *tm)
{
    const size_t bytes = 1ull << 30;
    void *a = NULL, *b = NULL;
    double best = 0;
    if (gpu_alloc(&a, bytes, NULL, 0) == 0 && gpu_alloc(&b, bytes, NULL, 0) == 0) {
        for (int r = 0; r < 4; r++) {
            double ms = 0;
            gpu_timer_start(c, tm);
            gpu_copy(c, GPU_MAIN, b, a, bytes);
            gpu_timer_stop(c, tm);
            if (gpu_timer_ms(c, tm, &ms) == 0 && ms > 0 && r > 0)
                best = 2.0 * bytes / (ms * 1e-3) / 1e9 > best ? 2.0 * bytes / (ms * 1e-3) / 1e9 : best;
        }
    }
    gpu_free(a);
    gpu_free(b);
    return best;
}

int hybrid_bench_ops(tandem_session *s, const char *model, int T, char *err, size_t errlen)
{
    hybrid_session *hs = s->hys;
    const model_desc *d = &s->e->d;
    if (!hs)
        return td_err(err, errlen, TANDEM_EINVAL, "bench ops: the session has no GPU state");
    if (d->attn != ATTN_GQA) {
        printf("# bench ops: %s uses MLA; the per-op table covers GQA layers only (not supported yet)\n", model);
        return 0;
    }
    int l = 0; /* the first MoE layer */
    while (l < d->n_layer && !d->layer_moe[l])
        l++;
    if (l == d->n_layer)
        return td_err(err, errlen, TANDEM_EINVAL, "bench ops: %s has no MoE layer", model);
    gpu_timer *tm = NULL;
    int rc = gpu_timer_create(&tm, err, errlen);
    if (rc)
        return rc;
    const double bw = copy_gbps(hs->c, tm);
    printf("# bench ops: %s layer %d, T=%d, device copy %.0f GB/s (read + write), %d launches per graph\n", model, l,
           T, bw, HO_REPS);
    const hy_layer *L = &hs->hy->L[l];
    const int64_t kv_bytes = 2 * (int64_t)(s->len[0] + 1) * d->n_kv_head * d->head_dim * 4;
    struct {
        const char *name;
        op_fn fn;
        int64_t bytes;
    } ops[] = {
        { "qkv", op_qkv, mat_bytes(&L->qkv) },
        { "qk_prep", op_prep, 0 },
        { "attention", op_attn, kv_bytes },
        { "o", op_o, mat_bytes(&L->o) },
        { "gate", op_gate, mat_bytes(&L->router) },
        { "add_norm", op_add_norm, 0 },
        { "lm_head", op_lm_head, mat_bytes(&hs->hy->lm_head) },
    };
    const op_env v = { hs, l, T };
    double layer_us[2] = { 0, 0 };
    for (int fast = 1; !rc && fast >= 0; fast--) {
        gpu_ctx_set_fast(hs->c, fast);
        for (size_t i = 0; !rc && i < sizeof ops / sizeof ops[0]; i++) {
            double us = 0;
            rc = time_op(hs, ops[i].fn, &v, tm, &us, err, errlen);
            if (rc)
                break;
            double gbps = ops[i].bytes / (us * 1e-6) / 1e9;
            printf("bench=gpu_op model=%s op=%s kernels=%s T=%d us=%.2f MB=%.2f GBps=%.0f hbm_frac=%.3f\n", model,
                   ops[i].name, fast ? "decode" : "first", T, us, ops[i].bytes / 1e6, ops[i].bytes ? gbps : 0,
                   ops[i].bytes && bw > 0 ? gbps / bw : 0);
            if (strcmp(ops[i].name, "lm_head"))
                layer_us[fast] += us;
        }
    }
    gpu_ctx_set_fast(hs->c, hs->o.fast);
    if (!rc)
        printf("bench=gpu_layer model=%s T=%d layer_us_decode=%.1f layer_us_first=%.1f x%d_layers_ms_decode=%.2f "
               "x%d_layers_ms_first=%.2f\n",
               model, T, layer_us[1], layer_us[0], d->n_layer, layer_us[1] * d->n_layer * 1e-3, d->n_layer,
               layer_us[0] * d->n_layer * 1e-3);
    fflush(stdout);
    gpu_timer_free(tm);
    return rc;
}

int hybrid_graph_counts(const tandem_session *s, int T, gpu_graph_counts *out)
{
    memset(out, 0, sizeof *out);
    const hybrid_session *hs = s->hys;
    for (int i = 0; hs && i < hs->n_graphs; i++)
        if (hs->graphs[i].T == T)
            return gpu_graph_count(hs->graphs[i].g, out);
    return TANDEM_EINVAL;
}
