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
 * yet made on the H200. One staging area, copied on the main stream before
 * the layer's experts run: no overlap of the next layer's copy with this
 * layer's compute yet. The copies come from the checkpoint's host memory
 * as it is (mmapped or owned, not pinned), so the driver stages them.
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
    int rc = gpu_alloc(&hs->stream_gu, 2 * E * hs->stream_row, err, errlen);
    if (!rc)
        rc = gpu_alloc(&hs->stream_dn, E * hs->stream_row, err, errlen);
    if (!rc)
        rc = gpu_alloc((void **)&hs->stream_slot, E * 4, err, errlen);
    if (!rc)
        rc = gpu_upload(hs->stream_slot, slot, E * 4, err, errlen);
    free(slot);
    if (rc)
        return td_err_prefix(err, errlen, rc, "expert streaming: one layer's experts on the GPU");
    hs->stream_ready = 1;
    td_log(TD_LOG_INFO, "expert streaming: passes of %d tokens or more run every MoE layer's experts on the GPU "
                        "(%.2f GB of staging)",
           hs->o.stream_min, 3.0 * E * hs->stream_row / 1e9);
    return 0;
}

void hy_stream_free(hybrid_session *hs)
{
    gpu_free(hs->stream_gu);
    gpu_free(hs->stream_dn);
    gpu_free(hs->stream_slot);
    hs->stream_gu = hs->stream_dn = NULL;
    hs->stream_slot = NULL;
    hs->stream_ready = 0;
}

/* Enqueue the copies of layer l's experts (gate_up [E][2F][D], down [E][D][F]) and describe them. */
void hy_stream_layer(hybrid_session *hs, int l, gpu_experts *out)
{
    const model_desc *d = &hs->e->d;
    const layer_weights *L = &hs->e->layers[l];
    const size_t row = hs->stream_row;
    uint8_t *gu = hs->stream_gu, *dn = hs->stream_dn;
    for (int x = 0; x < d->n_expert; x++) {
        gpu_copy(hs->c, GPU_MAIN, gu + (2 * (size_t)x) * row, L->exp_gate[x].data, row);
        gpu_copy(hs->c, GPU_MAIN, gu + (2 * (size_t)x + 1) * row, L->exp_up[x].data, row);
        gpu_copy(hs->c, GPU_MAIN, dn + (size_t)x * row, L->exp_down[x].data, row);
    }
    *out = (gpu_experts){ hs->stream_gu, hs->stream_dn, hs->stream_dt, hs->stream_slot, d->n_expert, d->d_model,
                          d->d_ff_expert };
}
