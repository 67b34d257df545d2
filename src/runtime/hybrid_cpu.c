/*
 * hybrid_cpu.c - the CPU side of the hand-off: the routed experts of one
 * layer from the pinned slot, and the two ways the GPU hands that work over.
 *
 * The work (cpu_layer): x = the layer's normed hidden states (bf16 for the
 * MoE operator, fp32 for the reference loop), ids (GPU-held experts already
 * -1; the immediate or the deferred list), w -> y[t] = sum_k w[t][k] *
 * expert_ids[t][k](x[t]), written to the pinned slot (y for the immediate
 * experts, ydef[l & 1] for the deferred ones). It runs the engine's thread
 * pool; the caller of the pool is whichever thread runs cpu_layer (a CUDA
 * host-function thread, or the watcher below), which is safe because nothing
 * else uses the pool while a hybrid pass is in flight, and the jobs of a pass
 * run one after another (one side stream, or the one watcher).
 *
 * Hand-off (a), host functions: the side stream runs hy_cpu_layer() as a
 * host node; the node blocks that stream until the experts are done. A
 * deferring layer adds a second node after the join (its deferred experts),
 * which the next layer's node queues behind.
 * Hand-off (b), stream memory operations: per layer l the main stream
 * writes go[l] = 1 and, after the GPU's own work of the layer, waits for
 * done[l] == 1 and resets it to 0. The watcher thread, armed once per pass,
 * walks the CPU layers in order: it spins on go[l] (the GPU reaches it
 * within microseconds of the layer's attention), clears it, computes the
 * immediate experts, publishes done[l] = 1 with a release store after the
 * results (x86 stores reach the GPU in order), then computes the layer's
 * deferred experts while the GPU runs the next layer. The fixed flag values
 * make the sequence replayable inside a CUDA graph. If the GPU fails
 * mid-pass the main thread sets abort_step and the watcher stops spinning.
 * For passes of up to HY_ONE_CALL_T tokens a deferring layer's immediate and
 * deferred experts are one operator call (cpu_layer_one_call), which
 * publishes done[l] from inside the call once the immediate rows are final.
 *
 * A failure of the CPU experts (an id the operator does not hold) cannot be
 * returned from a host node: it is kept in hs->cpu_rc / cpu_msg, the result
 * is zero, and hybrid_forward() reports it after the pass.
 */
#include "core/bf16.h"
#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "cpu/ops.h"
#include "runtime/hybrid_impl.h"

#include <stdlib.h>
#include <string.h>

/* ---- the reference loop (fp32, as forward.c computes routed experts) -------------- */
static void ref_layer(hybrid_session *hs, int l, int T, const float *x, const int32_t *ids, const float *wts,
                      float *y)
{
    tandem_engine *e = hs->e;
    const model_desc *d = &e->d;
    const layer_weights *L = &e->layers[l];
    const int E = d->n_expert, K = d->n_expert_used, C = hs->chunk;
    const int64_t D = d->d_model, F = d->d_ff_expert;
    memset(hs->r_cnt, 0, (size_t)E * 4);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int ex = ids[t * K + k];
            if (ex < 0)
                continue;
            int n = hs->r_cnt[ex]++;
            hs->r_tok[(int64_t)ex * C + n] = t;
            hs->r_w[(int64_t)ex * C + n] = wts[t * K + k];
        }
    memset(y, 0, (size_t)(T * D) * 4);
    for (int ex = 0; ex < E; ex++) {
        int n = hs->r_cnt[ex];
        if (!n)
            continue;
        const int32_t *tok = hs->r_tok + (int64_t)ex * C;
        const float *w = hs->r_w + (int64_t)ex * C;
        for (int i = 0; i < n; i++)
            memcpy(hs->rx + i * D, x + tok[i] * D, (size_t)D * 4);
        op_matmul(e->pool, hs->rg, F, hs->rx, D, n, &L->exp_gate[ex], NULL);
        op_matmul(e->pool, hs->ru, F, hs->rx, D, n, &L->exp_up[ex], NULL);
        op_silu_mul(hs->rg, hs->ru, n * F);
        op_matmul(e->pool, hs->ry, D, hs->rg, F, n, &L->exp_down[ex], NULL);
        for (int i = 0; i < n; i++) {
            float *yt = y + tok[i] * D;
            const float *gy = hs->ry + i * D;
            for (int64_t j = 0; j < D; j++)
                yt[j] += w[i] * gy[j];
        }
    }
}

/* The immediate (deferred = 0) or deferred experts of layer l. */
static void cpu_layer(hybrid_session *hs, int l, int deferred)
{
    const int64_t t0 = hy_now_ns();
    const model_desc *d = &hs->e->d;
    const int T = hs->cur_T, K = d->n_expert_used, p = l & 1;
    const size_t ybytes = (size_t)T * (size_t)d->d_model * 4;
    const int32_t *ids = deferred ? hs->slot_ids_def[p] : hs->slot_ids[p];
    float *y = deferred ? hs->slot_ydef[p] : hs->slot_y;
    hy_layer *H = &hs->hy->L[l];
    if (hs->o.cpu_skip) {
        memset(y, 0, ybytes);
    } else if (H->moe) {
        int rc = moe_forward_bf16(H->moe, hs->ms, hs->e->pool, T, K, hs->slot_x[p], ids, hs->slot_w[p], y);
        if (rc) {
            if (!hs->cpu_rc) {
                hs->cpu_rc = rc;
                snprintf(hs->cpu_msg, sizeof hs->cpu_msg, "layer %d: CPU experts: %s", l,
                         moe_scratch_error(hs->ms));
            }
            memset(y, 0, ybytes);
        }
    } else {
        ref_layer(hs, l, T, hs->slot_x[p], ids, hs->slot_w[p], y);
    }
    const int64_t dt = hy_now_ns() - t0;
    atomic_fetch_add(&hs->cpu_ns, dt);
    if (deferred)
        atomic_fetch_add(&hs->cpu_def_ns, dt);
}

/* ---- a deferring layer in one call (hand-off (b), T <= HY_ONE_CALL_T) ------------------ *
 * The immediate experts are the early rows of one operator call, the deferred ones its late
 * rows (the same hidden state twice): eight experts in one call stream as fast as eight in
 * d = 0, where an immediate call and a call for one deferred expert did not (a lone expert
 * ran at about half the bandwidth on the H200). The GPU is signalled from the operator the
 * moment the immediate rows are final; the deferred rows finish while it runs the next
 * layer. */
typedef struct {
    hybrid_session *hs;
    int l, T, signalled;
    int64_t t_early;
} one_call;

static void one_call_early(void *arg)
{
    one_call *oc = arg;
    hybrid_session *hs = oc->hs;
    memcpy(hs->slot_y, hs->y2, (size_t)oc->T * (size_t)hs->e->d.d_model * 4);
    __atomic_store_n(&hs->flags[2 * oc->l + 1], 1, __ATOMIC_RELEASE); /* done[l]: after y, x86 keeps the order */
    oc->signalled = 1;
    oc->t_early = hy_now_ns();
}

static void cpu_layer_one_call(hybrid_session *hs, int l)
{
    const int64_t t0 = hy_now_ns();
    const model_desc *d = &hs->e->d;
    const int T = hs->cur_T, K = d->n_expert_used, p = l & 1;
    const size_t D = (size_t)d->d_model, xrow = (size_t)T * D;
    memcpy(hs->x2, hs->slot_x[p], xrow * 2);
    memcpy(hs->x2 + xrow, hs->slot_x[p], xrow * 2);
    memcpy(hs->ids2, hs->slot_ids[p], (size_t)T * K * 4);
    memcpy(hs->ids2 + (size_t)T * K, hs->slot_ids_def[p], (size_t)T * K * 4);
    memcpy(hs->w2, hs->slot_w[p], (size_t)T * K * 4);
    memcpy(hs->w2 + (size_t)T * K, hs->slot_w[p], (size_t)T * K * 4);
    one_call oc = { hs, l, T, 0, 0 };
    int rc = moe_forward_bf16_early(hs->hy->L[l].moe, hs->ms2, hs->e->pool, 2 * T, T, K, hs->x2, hs->ids2, hs->w2,
                                    hs->y2, one_call_early, &oc);
    if (rc) {
        if (!hs->cpu_rc) {
            hs->cpu_rc = rc;
            snprintf(hs->cpu_msg, sizeof hs->cpu_msg, "layer %d: CPU experts: %s", l, moe_scratch_error(hs->ms2));
        }
        memset(hs->y2, 0, 2 * xrow * 4);
        if (!oc.signalled)
            one_call_early(&oc);
    }
    memcpy(hs->slot_ydef[p], hs->y2 + xrow, xrow * 4);
    const int64_t t1 = hy_now_ns();
    atomic_fetch_add(&hs->cpu_ns, t1 - t0);
    atomic_fetch_add(&hs->cpu_def_ns, t1 - oc.t_early);
}

void hy_cpu_layer(void *job)
{
    const hy_job *j = job;
    cpu_layer(j->hs, j->layer, j->deferred);
}

/* ---- hand-off (b): the watcher ---------------------------------------------------- */
static void *watch_main(void *arg)
{
    hybrid_session *hs = arg;
    const model_desc *d = &hs->e->d;
    /* the watcher drives the pool as its thread 0: give it thread 0's core, not one a worker holds */
    pool_bind_caller(hs->e->pool);
    pthread_mutex_lock(&hs->mu);
    for (;;) {
        while (!hs->armed && !hs->quit)
            pthread_cond_wait(&hs->cv, &hs->mu);
        if (hs->quit)
            break;
        pthread_mutex_unlock(&hs->mu);
        for (int l = 0; l < d->n_layer; l++) {
            if (!hy_layer_has_cpu(hs->hy, d, l))
                continue;
            uint32_t *go = &hs->flags[2 * l], *done = &hs->flags[2 * l + 1];
            int aborted = 0;
            while (__atomic_load_n(go, __ATOMIC_ACQUIRE) != 1) {
                if (atomic_load_explicit(&hs->abort_step, memory_order_relaxed)) {
                    aborted = 1;
                    break;
                }
                __builtin_ia32_pause();
            }
            if (aborted)
                break;
            __atomic_store_n(go, 0, __ATOMIC_RELAXED);
            if (hs->defers[l] && !hs->o.no_handoff && hs->ms2 && !hs->o.cpu_skip && hs->cur_T <= HY_ONE_CALL_T) {
                cpu_layer_one_call(hs, l); /* signals done[l] itself, from inside the call */
                continue;
            }
            cpu_layer(hs, l, 0);
            __atomic_store_n(done, 1, __ATOMIC_RELEASE);
            if (hs->defers[l] && !hs->o.no_handoff)
                cpu_layer(hs, l, 1); /* while the GPU runs layer l + 1 */
        }
        pthread_mutex_lock(&hs->mu);
        hs->armed = 0;
        pthread_cond_broadcast(&hs->cv);
    }
    pthread_mutex_unlock(&hs->mu);
    return NULL;
}

int hy_cpu_arm(hybrid_session *hs)
{
    if (!hs->th_started)
        return 0;
    pthread_mutex_lock(&hs->mu);
    hs->armed = 1;
    pthread_cond_broadcast(&hs->cv);
    pthread_mutex_unlock(&hs->mu);
    return 0;
}

/* After the pass: wait until the watcher is idle again. */
void hy_cpu_disarm(hybrid_session *hs, int aborted)
{
    if (!hs->th_started)
        return;
    if (aborted)
        atomic_store(&hs->abort_step, 1);
    pthread_mutex_lock(&hs->mu);
    while (hs->armed)
        pthread_cond_wait(&hs->cv, &hs->mu);
    pthread_mutex_unlock(&hs->mu);
    if (aborted) {
        memset(hs->flags, 0, (size_t)hs->e->d.n_layer * 2 * sizeof *hs->flags);
        atomic_store(&hs->abort_step, 0);
    }
}

/* ---- setup -------------------------------------------------------------------------- */
int hy_cpu_init(hybrid_session *hs, char *err, size_t errlen)
{
    const model_desc *d = &hs->e->d;
    const hybrid_engine *hy = hs->hy;
    const int C = hs->chunk;
    hs->jobs = calloc((size_t)d->n_layer * 2, sizeof *hs->jobs);
    if (!hs->jobs)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    for (int l = 0; l < d->n_layer; l++) {
        hs->jobs[2 * l] = (hy_job){ hs, l, 0 };
        hs->jobs[2 * l + 1] = (hy_job){ hs, l, 1 };
    }
    pthread_mutex_init(&hs->mu, NULL);
    pthread_cond_init(&hs->cv, NULL);
    const moe_op *big = NULL;
    int any_cpu = 0;
    for (int l = 0; l < d->n_layer; l++) {
        if (!hy_layer_has_cpu(hy, d, l))
            continue;
        any_cpu = 1;
        if (hy->L[l].moe && (!big || moe_n_held(hy->L[l].moe) > moe_n_held(big)))
            big = hy->L[l].moe;
    }
    if (big) {
        int rc = moe_scratch_create(big, C, d->n_expert_used, &hs->ms, err, errlen);
        if (rc)
            return rc;
        int any_defer = 0;
        for (int l = 0; l < d->n_layer; l++)
            any_defer |= hs->defers[l] && hy_layer_has_cpu(hy, d, l);
        if (any_defer && hs->o.handoff == HY_HANDOFF_MEMOP) {
            const int T2 = 2 * (C < HY_ONE_CALL_T ? C : HY_ONE_CALL_T);
            const size_t K = (size_t)d->n_expert_used, D = (size_t)d->d_model;
            rc = moe_scratch_create(big, T2, (int)K, &hs->ms2, err, errlen);
            if (rc)
                return rc;
            hs->x2 = td_alloc((size_t)T2 * D * 2);
            hs->ids2 = td_alloc((size_t)T2 * K * 4);
            hs->w2 = td_alloc((size_t)T2 * K * 4);
            hs->y2 = td_alloc((size_t)T2 * D * 4);
            if (!hs->x2 || !hs->ids2 || !hs->w2 || !hs->y2)
                return td_err(err, errlen, TANDEM_ENOMEM, "out of memory for the CPU expert scratch");
        }
    } else if (any_cpu) {
        const int64_t D = d->d_model, F = d->d_ff_expert, E = d->n_expert;
        hs->rx = td_alloc((size_t)(C * D) * 4);
        hs->ry = td_alloc((size_t)(C * D) * 4);
        hs->rg = td_alloc((size_t)(C * F) * 4);
        hs->ru = td_alloc((size_t)(C * F) * 4);
        hs->r_cnt = td_alloc((size_t)E * 4);
        hs->r_tok = td_alloc((size_t)(E * C) * 4);
        hs->r_w = td_alloc((size_t)(E * C) * 4);
        if (!hs->rx || !hs->ry || !hs->rg || !hs->ru || !hs->r_cnt || !hs->r_tok || !hs->r_w)
            return td_err(err, errlen, TANDEM_ENOMEM, "out of memory for the CPU expert scratch");
    }
    if (any_cpu && hs->o.handoff == HY_HANDOFF_MEMOP) {
        if (pthread_create(&hs->th, NULL, watch_main, hs) != 0)
            return td_err(err, errlen, TANDEM_ENOMEM, "could not start the hand-off thread");
        hs->th_started = 1;
    }
    return 0;
}

void hy_cpu_free(hybrid_session *hs)
{
    if (hs->th_started) {
        atomic_store(&hs->abort_step, 1);
        pthread_mutex_lock(&hs->mu);
        hs->quit = 1;
        pthread_cond_broadcast(&hs->cv);
        pthread_mutex_unlock(&hs->mu);
        pthread_join(hs->th, NULL);
        hs->th_started = 0;
    }
    if (hs->jobs) {
        pthread_mutex_destroy(&hs->mu);
        pthread_cond_destroy(&hs->cv);
    }
    moe_scratch_free(hs->ms);
    moe_scratch_free(hs->ms2);
    free(hs->x2);
    free(hs->ids2);
    free(hs->w2);
    free(hs->y2);
    free(hs->jobs);
    free(hs->rx);
    free(hs->ry);
    free(hs->rg);
    free(hs->ru);
    free(hs->r_cnt);
    free(hs->r_tok);
    free(hs->r_w);
}
