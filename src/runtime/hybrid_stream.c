/*
 * hybrid_stream.c - streaming a MoE layer's routed experts to the GPU for
 * long passes (DESIGN.md section 1, prefill): instead of handing the layer's
 * CPU experts to the CPU, copy every expert of the layer (as stored: BF16,
 * or F32 for F32 checkpoints) from host memory into a device staging area
 * and run them all there with the GPU expert kernels (for long passes of
 * BF16 experts, the grouped GEMMs of gpu_moe_grouped.cu).
 *
 * A session streams passes of hybrid_opts.stream_min tokens or more
 * (environment TANDEM_GPU_STREAM_MIN; `tandem bench e2e --pcie` prints one
 * layer's copy and GPU times against the CPU's, the measurement behind the
 * threshold). A split pass (under HY_SPLIT_MAX_T tokens) copies only the
 * first stream_n experts of each layer and hands the others to the CPU as
 * usual, both at once; hy_stream_plan picks stream_n from the copy and CPU
 * times measured once per engine (split_init). Two staging areas when
 * the GPU has room: the next streamed
 * layer's experts are copied on the side stream while this layer computes
 * (hy_stream_begin enqueues the first layer's copy, each hy_stream_layer
 * waits for its own and starts the next); one area when it has not, copied
 * on the main stream before use.
 * The copies read the checkpoint's host memory as it is (mmapped or owned),
 * page-locked once per engine (hy_stream_pin): from pageable memory the
 * copy engine ran at 7 GB/s on the H200 against 54 GB/s pinned, and CUDA
 * stages such a copy on the host, so it neither overlaps nor beats the CPU.
 * Where the memory cannot be pinned (too large a share of RAM, or the
 * driver refuses), streaming stays off, with a warning.
 */
#include "core/err.h"
#include "core/log.h"
#include "runtime/hybrid_impl.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int first_moe(const model_desc *d)
{
    for (int l = 0; l < d->n_layer; l++)
        if (d->layer_moe[l])
            return l;
    return -1;
}

typedef struct {
    uintptr_t lo, hi;
} span;

static int span_cmp(const void *a, const void *b)
{
    const span *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Page-lock the routed experts of every streamed layer, once per engine: the
 * tensors' pages, sorted and merged (neighbouring tensors share pages), one
 * registration per run of pages. 0 when pinned; otherwise streaming stays
 * off (hy->pin_state -1, the reason logged). */
static int hy_stream_pin(hybrid_engine *hy, const tandem_engine *e)
{
    if (hy->pin_state)
        return hy->pin_state > 0 ? 0 : -1;
    hy->pin_state = -1;
    const model_desc *d = &e->d;
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    size_t n = 0;
    for (int l = 0; l < d->n_layer; l++)
        n += hy_layer_has_cpu(hy, d, l) ? 3 * (size_t)d->n_expert : 0;
    span *sp = malloc((n ? n : 1) * sizeof *sp);
    if (!sp)
        return -1;
    size_t k = 0;
    for (int l = 0; l < d->n_layer; l++)
        for (int x = 0; hy_layer_has_cpu(hy, d, l) && x < d->n_expert; x++) {
            const mat *m[3] = { &e->layers[l].exp_gate[x], &e->layers[l].exp_up[x], &e->layers[l].exp_down[x] };
            for (int j = 0; j < 3; j++) {
                uintptr_t a = (uintptr_t)m[j]->data;
                size_t bytes = (size_t)m[j]->rows * (size_t)m[j]->cols * (m[j]->dt == DT_F32 ? 4 : 2);
                sp[k++] = (span){ a / pg * pg, (a + bytes + pg - 1) / pg * pg };
            }
        }
    qsort(sp, k, sizeof *sp, span_cmp);
    size_t runs = 0, total = 0;
    for (size_t i = 0; i < k; i++) {
        if (runs && sp[i].lo <= sp[runs - 1].hi) {
            if (sp[i].hi > sp[runs - 1].hi)
                sp[runs - 1].hi = sp[i].hi;
        } else {
            sp[runs++] = sp[i];
        }
    }
    for (size_t i = 0; i < runs; i++)
        total += sp[i].hi - sp[i].lo;
    const double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)pg;
    if ((double)total > 0.75 * ram) {
        td_log(TD_LOG_WARN, "expert streaming off: the experts (%.1f GB) are too large a share of RAM (%.1f GB) "
                            "to page-lock, and unpinned copies lose to the CPU", (double)total / 1e9, ram / 1e9);
        free(sp);
        return -1;
    }
    hy->pins = calloc(runs ? runs : 1, sizeof *hy->pins);
    char why[256] = "out of memory";
    const int64_t t0 = hy_now_ns();
    int rc = hy->pins ? 0 : -1;
    for (size_t i = 0; !rc && i < runs; i++) {
        rc = gpu_host_register((void *)sp[i].lo, sp[i].hi - sp[i].lo, why, sizeof why);
        if (!rc)
            hy->pins[hy->n_pins++] = (void *)sp[i].lo;
    }
    free(sp);
    if (rc) {
        td_log(TD_LOG_WARN, "expert streaming off: could not page-lock the experts' host memory (%s)", why);
        hy_stream_unpin(hy);
        hy->pin_state = -1;
        return -1;
    }
    hy->pin_state = 1;
    td_log(TD_LOG_INFO, "expert streaming: %.1f GB of experts page-locked in %zu ranges (%.1f s)",
           (double)total / 1e9, runs, (double)(hy_now_ns() - t0) * 1e-9);
    return 0;
}

void hy_stream_unpin(hybrid_engine *hy)
{
    for (int i = 0; i < hy->n_pins; i++)
        gpu_host_unregister(hy->pins[i]);
    free(hy->pins);
    hy->pins = NULL;
    hy->n_pins = 0;
    hy->pin_state = 0;
}

int hybrid_stream_source_ok(const tandem_engine *e)
{
    const int l0 = first_moe(&e->d);
    if (l0 < 0)
        return 0;
    const mat *m = &e->layers[l0].exp_gate[0];
    return m->data && (m->dt == DT_BF16 || m->dt == DT_F32);
}

/* Whether this session can stream: one staging layout for every layer's
 * experts (a model whose layers keep them in different dtypes cannot share
 * one), and the experts page-locked. Otherwise streaming stays off, with a
 * warning. Decided before the session sizes its scratch. */
int hy_stream_usable(hybrid_session *hs)
{
    const tandem_engine *e = hs->e;
    const model_desc *d = &e->d;
    const int l0 = first_moe(d);
    if (l0 < 0)
        return 0;
    const td_dtype dt = e->layers[l0].exp_gate[0].dt;
    if (!hybrid_stream_source_ok(e)) {
        td_log(TD_LOG_WARN, "expert streaming off: it copies BF16 experts from the checkpoint's own pages, and this "
                            "model's experts are %s",
               e->layers[l0].exp_gate[0].data ? dtype_name(dt) : "dummy weights (generated while packing)");
        return 0;
    }
    for (int l = 0; l < d->n_layer; l++)
        for (int x = 0; d->layer_moe[l] && x < d->n_expert; x++) {
            const layer_weights *L = &e->layers[l];
            if (L->exp_gate[x].dt != dt || L->exp_up[x].dt != dt || L->exp_down[x].dt != dt ||
                !L->exp_gate[x].data || !L->exp_up[x].data || !L->exp_down[x].data) {
                td_log(TD_LOG_WARN, "expert streaming off: layer %d expert %d is not stored like layer %d's", l, x,
                       l0);
                return 0;
            }
        }
    return hy_stream_pin(hs->hy, e) == 0;
}

static void copy_layer(hybrid_session *hs, int l, int b, int stream);

/* The device slot map of a pass that streams the first n experts: x -> x for
 * x < n, else -1 (so the hand-off lists give the others to the CPU). Written
 * only when n changes, between passes (run_pass syncs, so no kernel still
 * reads the old map). */
static int set_slot(hybrid_session *hs, int n)
{
    const int E = hs->e->d.n_expert;
    if (n == hs->stream_slot_n)
        return 0;
    int32_t *slot = malloc((size_t)E * 4);
    if (!slot)
        return TANDEM_ENOMEM;
    for (int x = 0; x < E; x++)
        slot[x] = x < n ? x : -1;
    int rc = gpu_upload(hs->stream_slot, slot, (size_t)E * 4, NULL, 0);
    free(slot);
    hs->stream_slot_n = rc ? -1 : n;
    return rc;
}

/* What a split pass needs, measured once per engine by the first session
 * that balances (a fixed share needs neither): one layer's copy time (layer
 * l0's experts into area 0) and the CPU operator's time per (token, expert)
 * pair (layer l0's operator on up to 512 tokens of zeros spread evenly over
 * the experts; the second of two calls). A session that keeps experts on the
 * GPU (the CPU operator then lacks them), or whose CPU side is the reference
 * loop without a fixed share (no rate to balance with), streams whole layers
 * only. */
static int split_init(hybrid_session *hs, int l0, char *err, size_t errlen)
{
    const tandem_engine *e = hs->e;
    hybrid_engine *hy = hs->hy;
    const model_desc *d = &e->d;
    const int E = d->n_expert, K = d->n_expert_used, D = d->d_model;
    moe_op *op = hy->L[l0].moe;
    const int has_op = !hy->cpu_ref && op && hs->ms && moe_n_held(op) == E;
    hs->stream_can_split = 0;
    if (hy->plan.gpu_experts > 0 || (!has_op && !hy->cpu_ref) || (!has_op && hs->o.stream_share <= 0))
        return 0;
    if (hs->o.stream_share <= 0 && hy->stream_pair_us <= 0) {
        int64_t t0 = hy_now_ns();
        copy_layer(hs, l0, 0, GPU_MAIN);
        int rc = gpu_sync(hs->c, err, errlen);
        if (rc)
            return td_err_prefix(err, errlen, rc, "expert streaming: timing one layer's copy");
        const double copy_ms = (double)(hy_now_ns() - t0) * 1e-6;
        const int T = hs->chunk < 512 ? hs->chunk : 512;
        uint16_t *x = calloc((size_t)T * D, 2);
        int32_t *ids = malloc((size_t)T * K * 4);
        float *w = malloc((size_t)T * K * 4), *y = malloc((size_t)T * D * 4);
        rc = x && ids && w && y ? 0 : td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
        for (int i = 0; !rc && i < T * K; i++) {
            ids[i] = (i / K + (i % K) * (E / K)) % E; /* distinct within a token: E >= K */
            w[i] = 1.0f / (float)K;
        }
        double ms = 0;
        for (int r = 0; !rc && r < 2; r++) {
            t0 = hy_now_ns();
            rc = moe_forward_bf16(op, hs->ms, e->pool, T, K, x, ids, w, y);
            ms = (double)(hy_now_ns() - t0) * 1e-6;
        }
        free(x), free(ids), free(w), free(y);
        if (rc)
            return td_err(err, errlen, rc, "expert streaming: timing the CPU operator: %s",
                          moe_scratch_error(hs->ms));
        hy->stream_copy_ms = copy_ms;
        hy->stream_pair_us = ms * 1e3 / ((double)T * K);
        const double A = 1024.0 * K * hy->stream_pair_us * 1e-3; /* ms of CPU for every expert of 1024 tokens */
        td_log(TD_LOG_INFO, "expert streaming: a layer's copy %.1f ms, the CPU %.2f us per (token, expert): passes "
                            "under %d tokens stream the share that balances the two (1024 tokens: %.0f%%) and the "
                            "CPU takes the rest at the same time",
               hy->stream_copy_ms, hy->stream_pair_us, HY_SPLIT_MAX_T, 100.0 * A / (A + hy->stream_copy_ms));
    }
    hs->stream_can_split = 1;
    return 0;
}

/* Whether a pass of T tokens streams, and how many experts (hs->stream_n):
 * all of them, or for a split pass the share s that makes the CPU's part
 * (1 - s) * A as long as the copy's s * C, A the CPU time of every expert
 * (T * K pairs at the measured rate), C a whole layer's copy: each layer then
 * takes A * C / (A + C), less than either alone. That leaves out the GPU's
 * own part of a layer, which runs before the CPU's and grows with T (the
 * copy overlaps it, the CPU does not): on the H200 a split pass of 2048
 * tokens was no faster than streaming everything, and at 4096 slower, so
 * passes of HY_SPLIT_MAX_T tokens or more stream whole layers.
 * hybrid_opts.stream_share fixes s instead. A slot map that cannot be
 * written leaves the pass to the CPU. */
int hy_stream_plan(hybrid_session *hs, int T)
{
    const model_desc *d = &hs->e->d;
    const int E = d->n_expert;
    hs->stream_n = E;
    if (!hs->stream_ready || T < hs->o.stream_min)
        return 0;
    int n = E;
    if (hs->stream_can_split && (hs->o.stream_share > 0 || T < HY_SPLIT_MAX_T)) {
        double share = hs->o.stream_share;
        if (share <= 0) {
            const double A = (double)T * d->n_expert_used * hs->hy->stream_pair_us * 1e-3;
            share = A / (A + hs->hy->stream_copy_ms);
        }
        n = (int)(share * E + 0.5);
        if (n < 1)
            return 0; /* not one expert's copy pays: the CPU takes the pass */
        n = n < E ? n : E;
    }
    if (set_slot(hs, n))
        return 0;
    hs->stream_n = n;
    return 1;
}

/* Staging for one layer, when the session streams (hy_stream_usable said
 * it can). Without GPU memory for one area, streaming stays off, with a
 * warning: the session still runs, its experts on the CPU. */
int hy_stream_init(hybrid_session *hs, char *err, size_t errlen)
{
    const tandem_engine *e = hs->e;
    const model_desc *d = &e->d;
    const int l0 = first_moe(d);
    hs->stream_ready = 0;
    if (hs->o.stream_min <= 0 || l0 < 0)
        return 0;
    const td_dtype dt = e->layers[l0].exp_gate[0].dt;
    const size_t es = dt == DT_F32 ? 4 : 2, E = (size_t)d->n_expert, D = (size_t)d->d_model,
                 F = (size_t)d->d_ff_expert;
    hs->stream_dt = dt == DT_F32 ? GPU_F32 : GPU_BF16;
    hs->stream_row = F * D * es; /* one gate, up or down matrix */
    char why[256] = "";
    if (gpu_alloc(&hs->stream_gu[0], 2 * E * hs->stream_row, why, sizeof why) ||
        gpu_alloc(&hs->stream_dn[0], E * hs->stream_row, why, sizeof why)) {
        hy_stream_free(hs);
        td_log(TD_LOG_WARN, "expert streaming off: no GPU memory for one layer's experts (%s)", why);
        return 0;
    }
    /* a second area for the overlap, where it fits (not an error where it does not) */
    hs->stream_bufs = 1;
    const char *one = getenv("TANDEM_GPU_STREAM_BUFS"); /* 1: one area (tests of that path) */
    if (!(one && atoi(one) == 1) && gpu_alloc(&hs->stream_gu[1], 2 * E * hs->stream_row, NULL, 0) == 0) {
        if (gpu_alloc(&hs->stream_dn[1], E * hs->stream_row, NULL, 0) == 0)
            hs->stream_bufs = 2;
        else {
            gpu_free(hs->stream_gu[1]);
            hs->stream_gu[1] = NULL;
        }
    }
    int rc = gpu_alloc((void **)&hs->stream_slot, E * 4, err, errlen);
    hs->stream_slot_n = -1;
    if (!rc)
        rc = set_slot(hs, (int)E);
    if (rc)
        return td_err_prefix(err, errlen, rc, "expert streaming: one layer's experts on the GPU");
    hs->stream_ready = 1;
    hs->stream_n = (int)E;
    rc = split_init(hs, l0, err, errlen);
    if (rc)
        return rc;
    td_log(TD_LOG_INFO, "expert streaming: passes of %d tokens or more run MoE layers' experts on the GPU "
                        "(%d x %.2f GB of staging%s)",
           hs->o.stream_min, hs->stream_bufs, 3.0 * E * hs->stream_row / 1e9,
           hs->stream_bufs == 2 ? ": the next layer's copy overlaps this layer" : ", no overlap");
    return 0;
}

void hy_stream_free(hybrid_session *hs)
{
    for (int b = 0; b < 2; b++) {
        gpu_free(hs->stream_gu[b]);
        gpu_free(hs->stream_dn[b]);
        hs->stream_gu[b] = hs->stream_dn[b] = NULL;
    }
    gpu_free(hs->stream_slot);
    hs->stream_slot = NULL;
    hs->stream_slot_n = -1;
    hs->stream_ready = 0;
}

/* the MoE layer after l that a streaming pass streams, or -1 */
static int next_streamed(const hybrid_session *hs, int l)
{
    const model_desc *d = &hs->e->d;
    for (int k = l + 1; k < d->n_layer; k++)
        if (hy_layer_has_cpu(hs->hy, d, k))
            return k;
    return -1;
}

/* copies of layer l's experts (gate_up [E][2F][D], down [E][D][F]) into area b, on a stream */
static void copy_layer(hybrid_session *hs, int l, int b, int stream)
{
    const layer_weights *L = &hs->e->layers[l];
    const size_t row = hs->stream_row;
    uint8_t *gu = hs->stream_gu[b], *dn = hs->stream_dn[b];
    for (int x = 0; x < hs->stream_n; x++) {
        gpu_copy(hs->c, stream, gu + (2 * (size_t)x) * row, L->exp_gate[x].data, row);
        gpu_copy(hs->c, stream, gu + (2 * (size_t)x + 1) * row, L->exp_up[x].data, row);
        gpu_copy(hs->c, stream, dn + (size_t)x * row, L->exp_down[x].data, row);
    }
}

/* Start of a streaming pass: with two areas, the first streamed layer's copy begins on the side stream
 * (after the main stream's earlier work, the previous pass's use of the areas included). */
void hy_stream_begin(hybrid_session *hs)
{
    hs->stream_cur = 0;
    const int l = next_streamed(hs, -1);
    if (hs->stream_bufs == 2 && l >= 0) {
        gpu_fork(hs->c);
        copy_layer(hs, l, 0, GPU_SIDE);
    }
}

/* Layer l's experts, ready on the main stream: with two areas, wait for the side stream's copy of l and
 * start the next streamed layer's copy into the other area (which the previous streamed layer, enqueued
 * on the main stream before this point, has finished with: the fork orders the copy after it). */
void hy_stream_layer(hybrid_session *hs, int l, gpu_experts *out)
{
    const model_desc *d = &hs->e->d;
    const int b = hs->stream_cur;
    if (hs->stream_bufs == 2) {
        gpu_join(hs->c);
        const int next = next_streamed(hs, l);
        if (next >= 0) {
            gpu_fork(hs->c);
            copy_layer(hs, next, b ^ 1, GPU_SIDE);
        }
        hs->stream_cur = b ^ 1;
    } else {
        copy_layer(hs, l, 0, GPU_MAIN);
    }
    *out = (gpu_experts){ hs->stream_gu[b], hs->stream_dn[b], hs->stream_dt, hs->stream_slot, d->n_expert,
                          d->d_model, d->d_ff_expert };
}
