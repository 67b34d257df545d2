/*
 * hybrid_stream.c - streaming a MoE layer's routed experts to the GPU for
 * long passes (DESIGN.md section 1, prefill): instead of handing the layer's
 * CPU experts to the CPU, copy every expert of the layer (as stored: BF16,
 * or F32 for F32 checkpoints) from host memory into a device staging area
 * and run them all there with the GPU expert kernels.
 *
 * Off unless a session asks for it (hybrid_opts.stream_min, environment
 * TANDEM_GPU_STREAM_MIN = tokens per pass from which a pass streams): the
 * threshold where it pays is a measurement of the machine (`tandem bench
 * e2e --pcie` prints one layer's copy and GPU times against the CPU's), not
 * yet made on the H200. Two staging areas when the GPU has room: the next
 * streamed layer's experts are copied on the side stream while this layer
 * computes (hy_stream_begin enqueues the first layer's copy, each
 * hy_stream_layer waits for its own and starts the next); one area when it
 * has not, copied on the main stream before use. The copies come from the
 * checkpoint's host memory as it is (mmapped or owned, not pinned). For such
 * a copy CUDA first syncs the stream and returns once it has staged the
 * bytes, so from one host thread the side stream's copy does not yet overlap
 * the main stream's work: the host waits for the fork point, then stages the
 * copy while the main stream holds nothing new. Real overlap needs pinned
 * sources: the pool copying the next layer into a pinned buffer after this
 * layer's compute is enqueued, the DMA from there, and an event before that
 * buffer is reused. Not built: the measurement decides first.
 */
#include "core/err.h"
#include "core/log.h"
#include "runtime/hybrid_impl.h"

#include <stdlib.h>
#include <string.h>

static int first_moe(const model_desc *d)
{
    for (int l = 0; l < d->n_layer; l++)
        if (d->layer_moe[l])
            return l;
    return -1;
}

/* Staging for one layer, when the session streams. A model whose layers
 * keep experts in different dtypes cannot share one staging layout: then
 * streaming stays off, with a warning. */
int hy_stream_init(hybrid_session *hs, char *err, size_t errlen)
{
    const tandem_engine *e = hs->e;
    const model_desc *d = &e->d;
    const int l0 = first_moe(d);
    hs->stream_ready = 0;
    if (hs->o.stream_min <= 0 || l0 < 0)
        return 0;
    const td_dtype dt = e->layers[l0].exp_gate[0].dt;
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
    const size_t es = dt == DT_F32 ? 4 : 2, E = (size_t)d->n_expert, D = (size_t)d->d_model,
                 F = (size_t)d->d_ff_expert;
    hs->stream_dt = dt == DT_F32 ? GPU_F32 : GPU_BF16;
    hs->stream_row = F * D * es; /* one gate, up or down matrix */
    int32_t *slot = malloc(E * 4);
    if (!slot)
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    for (size_t x = 0; x < E; x++)
        slot[x] = (int32_t)x;
    int rc = gpu_alloc(&hs->stream_gu[0], 2 * E * hs->stream_row, err, errlen);
    if (!rc)
        rc = gpu_alloc(&hs->stream_dn[0], E * hs->stream_row, err, errlen);
    /* a second area for the overlap, where it fits (not an error where it does not) */
    hs->stream_bufs = 1;
    const char *one = getenv("TANDEM_GPU_STREAM_BUFS"); /* 1: one area (tests of that path) */
    if (!rc && !(one && atoi(one) == 1) && gpu_alloc(&hs->stream_gu[1], 2 * E * hs->stream_row, NULL, 0) == 0) {
        if (gpu_alloc(&hs->stream_dn[1], E * hs->stream_row, NULL, 0) == 0)
            hs->stream_bufs = 2;
        else {
            gpu_free(hs->stream_gu[1]);
            hs->stream_gu[1] = NULL;
        }
    }
    if (!rc)
        rc = gpu_alloc((void **)&hs->stream_slot, E * 4, err, errlen);
    if (!rc)
        rc = gpu_upload(hs->stream_slot, slot, E * 4, err, errlen);
    free(slot);
    if (rc)
        return td_err_prefix(err, errlen, rc, "expert streaming: one layer's experts on the GPU");
    hs->stream_ready = 1;
    td_log(TD_LOG_INFO, "expert streaming: passes of %d tokens or more run every MoE layer's experts on the GPU "
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
    const model_desc *d = &hs->e->d;
    const layer_weights *L = &hs->e->layers[l];
    const size_t row = hs->stream_row;
    uint8_t *gu = hs->stream_gu[b], *dn = hs->stream_dn[b];
    for (int x = 0; x < d->n_expert; x++) {
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
