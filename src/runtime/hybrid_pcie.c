/*
 * hybrid_pcie.c - `tandem bench e2e --pcie`: the measurement behind the
 * question of issue 5 item 4. For a long prompt, is it faster to stream a
 * MoE layer's routed experts to the GPU over PCIe and run them there than
 * to run them on the CPU? Per MoE layer and T prompt tokens, all in one
 * process:
 *   h2d_ms   one layer's experts as BF16 (what the GPU kernels read), from
 *            pinned host memory, by the copy engine (best of 3); the rate
 *            from pageable memory beside it;
 *   gpu_ms   gpu_moe_experts on T tokens with every expert on the GPU
 *            (top-k routing drawn at random, best of 3);
 *   cpu_ms   the CPU MoE operator of the first MoE layer on the same T
 *            tokens (the hybrid engine's own op and format, best of 2).
 * Streaming overlaps the next layer's copy with this layer's compute, so a
 * layer costs max(h2d_ms, gpu_ms) against cpu_ms. The weights are
 * placeholders: timing does not depend on their values. Nothing here
 * changes how the engine runs; it only prints one BENCH.md line.
 */
#include "core/bf16.h"
#include "core/err.h"
#include "core/mem.h"
#include "runtime/hybrid_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t lcg(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

/* top-k distinct experts per token, weights 1/k */
static void routes(int T, int K, int E, int32_t *ids, float *w)
{
    uint64_t st = 12345;
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e, dup;
            do {
                e = (int)(lcg(&st) % (uint64_t)E);
                dup = 0;
                for (int j = 0; j < k; j++)
                    dup |= ids[t * K + j] == e;
            } while (dup);
            ids[t * K + k] = e;
            w[t * K + k] = 1.0f / (float)K;
        }
}

static double ms_since(int64_t t0) { return (double)(hy_now_ns() - t0) * 1e-6; }

static int first_moe_layer(const model_desc *d)
{
    for (int l = 0; l < d->n_layer; l++)
        if (d->layer_moe[l])
            return l;
    return -1;
}

int hybrid_bench_pcie(tandem_engine *e, const char *name, int T, char *err, size_t errlen)
{
    const model_desc *d = &e->d;
    const hybrid_engine *hy = e->hy;
    const int l0 = first_moe_layer(d), E = d->n_expert, K = d->n_expert_used;
    const int64_t D = d->d_model, F = d->d_ff_expert;
    if (!hy || l0 < 0)
        return td_err(err, errlen, TANDEM_EINVAL, "pcie probe: needs the GPU and a MoE layer");
    const size_t gu_bytes = (size_t)E * 2 * F * D * 2, dn_bytes = (size_t)E * D * F * 2;
    const size_t page_bytes = gu_bytes < ((size_t)256 << 20) ? gu_bytes : (size_t)256 << 20;
    void *host = NULL, *gu = NULL, *dn = NULL, *pageable = NULL;
    int32_t *slot_h = malloc((size_t)E * 4), *ids_h = malloc((size_t)T * K * 4), *slot = NULL, *ids = NULL;
    float *w_h = malloc((size_t)T * K * 4), *h_h = malloc((size_t)(T * D) * 4);
    float *h = NULL, *w = NULL, *x = NULL, *scratch = NULL;
    gpu_ctx *c = NULL;
    gpu_timer *tm = NULL;
    moe_scratch *ms = NULL;
    uint16_t *xb = NULL;
    float *y = NULL;
    int rc = slot_h && ids_h && w_h && h_h ? 0 : td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
    if (!rc)
        rc = gpu_host_alloc(&host, gu_bytes, err, errlen);
    if (!rc)
        rc = gpu_alloc(&gu, gu_bytes, err, errlen);
    if (!rc)
        rc = gpu_alloc(&dn, dn_bytes, err, errlen);
    if (rc) {
        char what[96];
        snprintf(what, sizeof what, "pcie probe: one layer's BF16 experts (%.2f GB) on both sides",
                 (gu_bytes + dn_bytes) / 1e9);
        td_err_prefix(err, errlen, rc, what);
        goto done;
    }
    memset(host, 0x3c, gu_bytes); /* bf16 0x3c3c ~ 0.0115 */

    /* 1. the copies */
    double h2d_ms = 0, page_ms = 0;
    for (int r = 0; !rc && r < 3; r++) {
        int64_t t0 = hy_now_ns();
        rc = gpu_upload(gu, host, gu_bytes, err, errlen);
        if (!rc)
            rc = gpu_upload(dn, host, dn_bytes, err, errlen);
        double ms = ms_since(t0);
        h2d_ms = r == 0 || ms < h2d_ms ? ms : h2d_ms;
    }
    pageable = td_alloc(page_bytes);
    if (!rc && pageable) {
        memset(pageable, 0x3c, page_bytes);
        for (int r = 0; !rc && r < 3; r++) {
            int64_t t0 = hy_now_ns();
            rc = gpu_upload(gu, pageable, page_bytes, err, errlen);
            double ms = ms_since(t0);
            page_ms = r == 0 || ms < page_ms ? ms : page_ms;
        }
    }

    /* 2. the experts on the GPU */
    for (int x_ = 0; x_ < E; x_++)
        slot_h[x_] = x_;
    routes(T, K, E, ids_h, w_h);
    for (int64_t i = 0; i < T * D; i++)
        h_h[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    if (!rc)
        rc = gpu_alloc((void **)&slot, (size_t)E * 4, err, errlen);
    if (!rc)
        rc = gpu_alloc((void **)&ids, (size_t)T * K * 4, err, errlen);
    if (!rc)
        rc = gpu_alloc((void **)&w, (size_t)T * K * 4, err, errlen);
    if (!rc)
        rc = gpu_alloc((void **)&h, (size_t)(T * D) * 4, err, errlen);
    if (!rc)
        rc = gpu_alloc((void **)&x, (size_t)(T * D) * 4, err, errlen);
    if (!rc)
        rc = gpu_alloc((void **)&scratch, (size_t)gpu_moe_scratch_floats(T, K, E, D, F) * 4, err, errlen);
    if (!rc)
        rc = gpu_upload(slot, slot_h, (size_t)E * 4, err, errlen);
    if (!rc)
        rc = gpu_upload(ids, ids_h, (size_t)T * K * 4, err, errlen);
    if (!rc)
        rc = gpu_upload(w, w_h, (size_t)T * K * 4, err, errlen);
    if (!rc)
        rc = gpu_upload(h, h_h, (size_t)(T * D) * 4, err, errlen);
    if (!rc)
        rc = gpu_ctx_create(&c, (size_t)T * K * (size_t)(D > F ? D : F), err, errlen);
    if (!rc)
        rc = gpu_timer_create(&tm, err, errlen);
    double gpu_ms = 0;
    gpu_experts ex = { gu, dn, GPU_BF16, slot, E, (int)D, (int)F };
    for (int r = 0; !rc && r < 4; r++) { /* the first is a warm-up */
        gpu_timer_start(c, tm);
        gpu_moe_experts(c, &ex, T, K, h, D, ids, w, x, D, scratch);
        gpu_timer_stop(c, tm);
        double ms = 0;
        rc = gpu_timer_ms(c, tm, &ms);
        if (!rc && r > 0)
            gpu_ms = r == 1 || ms < gpu_ms ? ms : gpu_ms;
    }

    /* 3. the CPU operator of the first MoE layer on the same tokens */
    double cpu_ms = -1;
    moe_op *op = hy->L[l0].moe;
    if (!rc && op) {
        xb = td_alloc((size_t)(T * D) * 2);
        y = td_alloc((size_t)(T * D) * 4);
        rc = xb && y ? moe_scratch_create(op, T, K, &ms, err, errlen)
                     : td_err(err, errlen, TANDEM_ENOMEM, "out of memory");
        for (int64_t i = 0; !rc && i < T * D; i++)
            xb[i] = f32_to_bf16(h_h[i]);
        for (int r = 0; !rc && r < 2; r++) {
            int64_t t0 = hy_now_ns();
            rc = moe_forward_bf16(op, ms, e->pool, T, K, xb, ids_h, w_h, y);
            double m = ms_since(t0);
            cpu_ms = r == 0 || m < cpu_ms ? m : cpu_ms;
        }
        if (rc)
            snprintf(err, errlen, "pcie probe: CPU experts: %s", moe_scratch_error(ms));
    }
    if (!rc) {
        double stream_ms = h2d_ms > gpu_ms ? h2d_ms : gpu_ms;
        printf("bench=prefill_stream model=%s tokens=%d layer_bf16_GB=%.3f h2d_pinned_GBps=%.1f "
               "h2d_pageable_GBps=%.1f h2d_ms=%.2f gpu_experts_ms=%.2f stream_ms=%.2f cpu_ms=%.2f "
               "stream_vs_cpu=%.2f\n",
               name, T, (gu_bytes + dn_bytes) / 1e9, (gu_bytes + dn_bytes) / 1e6 / h2d_ms,
               page_ms > 0 ? page_bytes / 1e6 / page_ms : 0.0, h2d_ms, gpu_ms, stream_ms, cpu_ms,
               cpu_ms > 0 && stream_ms > 0 ? cpu_ms / stream_ms : 0.0);
        fflush(stdout);
    }
done:
    moe_scratch_free(ms);
    free(xb);
    free(y);
    gpu_timer_free(tm);
    gpu_ctx_free(c);
    gpu_free(slot);
    gpu_free(ids);
    gpu_free(w);
    gpu_free(h);
    gpu_free(x);
    gpu_free(scratch);
    gpu_free(gu);
    gpu_free(dn);
    gpu_host_free(host);
    free(pageable);
    free(slot_h);
    free(ids_h);
    free(w_h);
    free(h_h);
    return rc;
}
