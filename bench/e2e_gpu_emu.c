/*
 * e2e_gpu_emu.c - a CPU emulation of src/cuda/gpu.h, to run the hybrid
 * schedule (placement, uploads, fused layouts, hand-off mechanisms, chunked
 * prefill, the e2e benchmark) and tests/test_gpu.c on a machine without a
 * GPU. Ops run synchronously on the calling thread with the CPU reference
 * ops; "device" memory is host memory; graph capture is refused, so sessions
 * fall back to eager passes (the tests' graph checks fail here by design).
 * Quantised weights (--gpu-weights int8/int4/fp8) go through gpu_quant.c's
 * reference dequantisation: exact products at the decode sizes (as the
 * GEMV's in-register dequantisation), weights and inputs rounded to BF16
 * above them (as the dequantised tiles fed to cuBLAS).
 * It checks the schedule, not the CUDA kernels. `make test-emu` builds it
 * with the test groups that pass here (--gpu_fast, --gpuw) and runs them;
 * by hand, against a CPU build:
 *
 *   make BUILD=build-cpu CUDA=0 build-cpu/run_tests
 *   cc -std=c11 -O1 -g -D_GNU_SOURCE -Iinclude -Isrc -c bench/e2e_gpu_emu.c -o /tmp/emu.o
 *   cc -o /tmp/emu_tests build-cpu/tests/run.o build-cpu/tests/test_gpu.o /tmp/emu.o \
 *      build-cpu/libtandem.a -ljansson -lnuma -lpcre2-8 -lutf8proc -lm -lpthread
 *   /tmp/emu_tests --gpu      (expected: only "graph" / "no graphs" failures)
 *   /tmp/emu_tests --gpu_fast (all pass: hybrid deferral against the CPU engine;
 *                              the kernel parts only check the tests' own logic here)
 * The objects of this file define every gpu.h symbol, so the linker never
 * takes gpu_none.o from the archive.
 */
#include "core/bf16.h"
#include "cpu/attn.h"
#include "cpu/ops.h"
#include "cpu/router.h"
#include "cuda/gpu.h"
#include "cuda/gpu_quant.h"
#include "tandem.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { EMU_MAX_TID = 64 }; /* attention scratch slots: the CPU kernels index theirs by pool_tid() */

struct gpu_ctx {
    int exact_max_T, rc;
    char msg[256];
    pool *p;
};

int gpu_device_count(char *why, size_t whylen) { (void)why, (void)whylen; return 1; }
int gpu_open(int device, gpu_info *info, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    if (device != 0)
        return TANDEM_EINVAL;
    if (info) {
        memset(info, 0, sizeof *info);
        snprintf(info->name, sizeof info->name, "CPU emulation");
        info->cc_major = 9;
        info->n_sm = 1;
        info->mem_total = info->mem_free = 16ull << 30;
        info->mem_ops = 1;
    }
    return 0;
}
int gpu_use_device(int device, char *err, size_t errlen) { (void)device, (void)err, (void)errlen; return 0; }
int gpu_mem_info(size_t *f, size_t *t, char *err, size_t errlen) { (void)err, (void)errlen; *f = *t = 16ull << 30; return 0; }
int gpu_alloc(void **p, size_t bytes, char *err, size_t errlen) { (void)err, (void)errlen; *p = calloc(1, bytes ? bytes : 16); return *p ? 0 : TANDEM_ENOMEM; }
void gpu_free(void *p) { free(p); }
int gpu_host_alloc(void **p, size_t bytes, char *err, size_t errlen) { return gpu_alloc(p, bytes, err, errlen); }
void gpu_host_free(void *p) { free(p); }
int gpu_host_register(void *p, size_t bytes, char *err, size_t errlen) { (void)p, (void)bytes, (void)err, (void)errlen; return 0; }
void gpu_host_unregister(void *p) { (void)p; }
int gpu_upload(void *d, const void *s, size_t n, char *err, size_t errlen) { (void)err, (void)errlen; memcpy(d, s, n); return 0; }
int gpu_download(void *d, const void *s, size_t n, char *err, size_t errlen) { (void)err, (void)errlen; memcpy(d, s, n); return 0; }
int gpu_memset(void *d, int v, size_t n, char *err, size_t errlen) { (void)err, (void)errlen; memset(d, v, n); return 0; }

int gpu_ctx_create(gpu_ctx **out, size_t scratch, char *err, size_t errlen)
{
    (void)scratch;
    gpu_ctx *c = calloc(1, sizeof *c);
    c->exact_max_T = 16;
    int rc = pool_create(&c->p, 1, 1, err, errlen);
    *out = c;
    return rc;
}
void gpu_ctx_free(gpu_ctx *c) { if (c) { pool_free(c->p); free(c); } }
int gpu_ctx_status(const gpu_ctx *c, char *err, size_t errlen) { if (c->rc && err) snprintf(err, errlen, "%s", c->msg); return c->rc; }
void gpu_ctx_clear(gpu_ctx *c) { c->rc = 0; }
int gpu_sync(gpu_ctx *c, char *err, size_t errlen) { return gpu_ctx_status(c, err, errlen); }
void gpu_ctx_set_exact(gpu_ctx *c, int m) { c->exact_max_T = m; }
int gpu_ctx_reserve_dequant(gpu_ctx *c, size_t elems, char *err, size_t errlen) { (void)elems, (void)err, (void)errlen; return c->rc; }
int gpu_copy(gpu_ctx *c, int s, void *d, const void *src, size_t n) { (void)s; memmove(d, src, n); return c->rc; }
int gpu_zero(gpu_ctx *c, int s, void *d, size_t n) { (void)s; memset(d, 0, n); return c->rc; }
int gpu_fork(gpu_ctx *c) { return c->rc; }
int gpu_join(gpu_ctx *c) { return c->rc; }
int gpu_host_fn(gpu_ctx *c, int s, void (*fn)(void *), void *arg) { (void)s; fn(arg); return c->rc; }
int gpu_flag_write(gpu_ctx *c, int s, uint32_t *f, uint32_t v) { (void)s; __atomic_store_n(f, v, __ATOMIC_RELEASE); return c->rc; }
int gpu_flag_wait(gpu_ctx *c, int s, uint32_t *f, uint32_t v) { (void)s; while (__atomic_load_n(f, __ATOMIC_ACQUIRE) != v) ; return c->rc; }
int gpu_capture_begin(gpu_ctx *c) { c->rc = TANDEM_EGPU; snprintf(c->msg, sizeof c->msg, "emulator: no graphs"); return c->rc; }
int gpu_capture_end(gpu_ctx *c, gpu_graph **out) { *out = NULL; return c->rc; }
int gpu_graph_launch(gpu_ctx *c, gpu_graph *g) { (void)g; return c->rc = TANDEM_EGPU; }
void gpu_graph_free(gpu_graph *g) { (void)g; }

static mat to_mat(const gpu_mat *W) { return (mat){ .data = W->data, .dt = W->dt == GPU_F32 ? DT_F32 : DT_BF16, .rows = W->rows, .cols = W->cols }; }
static int quantised(const gpu_mat *W) { return W->dt == GPU_INT8 || W->dt == GPU_INT4 || W->dt == GPU_FP8; }

/* A quantised matrix as F32 through gpu_quant.c's reference dequantisation; round: each weight rounded to BF16,
 * as gpu_gemm.cu's prefill path dequantises its tiles for cuBLAS. */
static float *dequant(const gpu_mat *W, int round)
{
    float *w = malloc((size_t)(W->rows * W->cols) * 4);
    for (int64_t r = 0; w && r < W->rows; r++) {
        gpu_wq_row_f32(W, r, w + r * W->cols);
        for (int64_t k = 0; round && k < W->cols; k++)
            w[r * W->cols + k] = bf16_to_f32(f32_to_bf16(w[r * W->cols + k]));
    }
    return w;
}

static int mm(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W, const float *bias,
              int acc, int exact)
{
    mat m = to_mat(W);
    float *wq = quantised(W) ? dequant(W, !exact) : NULL;
    if (wq)
        m = (mat){ .data = wq, .dt = DT_F32, .rows = W->rows, .cols = W->cols };
    float *tmp = malloc((size_t)T * W->rows * 4), *xr = calloc((size_t)T * W->cols, 4);
    if (!tmp || !xr || (quantised(W) && !wq)) {
        free(tmp), free(xr), free(wq);
        snprintf(c->msg, sizeof c->msg, "emulator: out of memory");
        return c->rc = TANDEM_ENOMEM;
    }
    for (int t = 0; t < T; t++)
        for (int64_t k = 0; k < W->cols; k++) {
            float v = x[t * ldx + k];
            xr[t * W->cols + k] = !exact && W->dt != GPU_F32 ? bf16_to_f32(f32_to_bf16(v)) : v;
        }
    op_matmul(c->p, tmp, W->rows, xr, W->cols, T, &m, bias);
    for (int t = 0; t < T; t++)
        for (int64_t n = 0; n < W->rows; n++)
            y[t * ldy + n] = (acc ? y[t * ldy + n] : 0) + tmp[t * W->rows + n];
    free(tmp), free(xr), free(wq);
    return c->rc;
}
int gpu_matmul(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W, const float *b, int acc)
{
    return mm(c, y, ldy, x, ldx, T, W, b, acc, T <= c->exact_max_T);
}
int gpu_matmul_exact(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W, const float *b, int acc)
{
    return mm(c, y, ldy, x, ldx, T, W, b, acc, 1);
}
int gpu_embed(gpu_ctx *c, float *x, const gpu_mat *t, const int32_t *tok, int T)
{
    mat m = to_mat(t);
    for (int i = 0; i < T; i++)
        if (quantised(t))
            gpu_wq_row_f32(t, tok[i], x + i * t->cols);
        else
            mat_row_f32(&m, tok[i], x + i * t->cols);
    return c->rc;
}
int gpu_rmsnorm(gpu_ctx *c, float *y, const float *x, int no, int64_t ldo, int ni, int64_t ldi, const float *w, int n, float eps)
{
    for (int o = 0; o < no; o++)
        for (int i = 0; i < ni; i++)
            op_rmsnorm(y + o * ldo + i * ldi, x + o * ldo + i * ldi, w, n, eps);
    return c->rc;
}
int gpu_gather_rows(gpu_ctx *c, float *d, int64_t ldd, const float *s, int64_t lds, const int32_t *rows, int n, int w)
{
    for (int i = 0; i < n; i++)
        memmove(d + i * ldd, s + rows[i] * lds, (size_t)w * 4);
    return c->rc;
}
int gpu_rope(gpu_ctx *c, float *x, int T, int64_t ldt, int H, int64_t ldh, int off, int dim, int pairs, const float *inv, float scale, const int32_t *pos)
{
    float cs[512], sn[512];
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < dim / 2; i++) {
            float ang = (float)pos[t] * inv[i];
            cs[i] = (float)cos((double)ang) * scale;
            sn[i] = (float)sin((double)ang) * scale;
        }
        for (int h = 0; h < H; h++)
            op_rope(x + t * ldt + h * ldh + off, dim, pairs, cs, sn);
    }
    return c->rc;
}
int gpu_kv_store(gpu_ctx *c, float *cache, int64_t ss, int64_t rs, const float *src, int64_t lds, int w, int T, const int32_t *seq, const int32_t *pos)
{
    for (int t = 0; t < T; t++)
        memcpy(cache + seq[t] * ss + pos[t] * rs, src + t * lds, (size_t)w * 4);
    return c->rc;
}
int gpu_attn_gqa(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq, const int32_t *pos, float *out, int64_t ldo)
{
    int qd = a->n_head * a->head_dim;
    float *qq = malloc((size_t)T * qd * 4), *oo = malloc((size_t)T * qd * 4);
    for (int t = 0; t < T; t++)
        memcpy(qq + t * qd, q + t * ldq, (size_t)qd * 4);
    attn_gqa_params p = { a->n_head, a->n_kv_head, a->head_dim, a->scale, a->window, a->k, a->v, a->seq_stride, a->row_stride };
    int64_t ss = attn_scratch_floats((int)(a->seq_stride / a->row_stride), 0, a->head_dim);
    /* a slot per pool thread index (pool_tid() of whichever thread calls, up to EMU_MAX_TID), 64-byte aligned */
    float *scr = aligned_alloc(64, ((size_t)ss * 4 * EMU_MAX_TID + 63) / 64 * 64); /* the AVX-512 kernels' stores */
    attn_gqa(c->p, &p, T, qq, seq, pos, oo, scr, ss);
    for (int t = 0; t < T; t++)
        memcpy(out + t * ldo, oo + t * qd, (size_t)qd * 4);
    free(qq), free(oo), free(scr);
    return c->rc;
}
int gpu_attn_mla(gpu_ctx *c, const gpu_mla *a, int T, const float *q, int64_t ldq, const int32_t *seq, const int32_t *pos, float *out, int64_t ldo, float *scratch)
{
    (void)scratch;
    int qd = a->n_head * (a->nope + a->rope), od = a->n_head * a->v_dim;
    float *qq = malloc((size_t)T * qd * 4), *oo = malloc((size_t)T * od * 4);
    for (int t = 0; t < T; t++)
        memcpy(qq + t * qd, q + t * ldq, (size_t)qd * 4);
    mat kvb = to_mat(&a->kv_b);
    attn_mla_params p = { a->n_head, a->nope, a->rope, a->v_dim, a->rank, a->scale, a->ckv, a->kpe, a->ckv_seq_stride, a->kpe_seq_stride, &kvb };
    int64_t ss = attn_scratch_floats((int)(a->ckv_seq_stride / a->rank), a->rank, 0);
    float *scr = aligned_alloc(64, ((size_t)ss * 4 * EMU_MAX_TID + 63) / 64 * 64); /* the AVX-512 kernels' stores */
    attn_mla(c->p, &p, T, qq, seq, pos, oo, scr, ss);
    for (int t = 0; t < T; t++)
        memcpy(out + t * ldo, oo + t * od, (size_t)od * 4);
    free(qq), free(oo), free(scr);
    return c->rc;
}
int gpu_route(gpu_ctx *c, const gpu_route_params *r, int T, const float *lg, int32_t *ids, float *w)
{
    route_params p = { (route_kind)r->kind, r->n_expert, r->k, r->norm, r->scale, r->n_group, r->topk_group, r->bias };
    float *scr = malloc((size_t)3 * r->n_expert * 4);
    for (int t = 0; t < T; t++)
        route_select(&p, lg + t * r->n_expert, ids + t * r->k, w + t * r->k, scr);
    free(scr);
    return c->rc;
}
int gpu_silu_mul(gpu_ctx *c, float *out, int64_t ldo, const float *gu, int64_t ldgu, int T, int F)
{
    for (int t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            float g = gu[t * ldgu + i];
            out[t * ldo + i] = g / (1.0f + expf(-g)) * gu[t * ldgu + F + i];
        }
    return c->rc;
}
int gpu_add_rows(gpu_ctx *c, float *x, int64_t ldx, const float *y, int64_t ldy, int T, int n, const float *gate)
{
    for (int t = 0; t < T; t++) {
        float g = gate ? 1.0f / (1.0f + expf(-gate[t])) : 1.0f;
        for (int i = 0; i < n; i++)
            x[t * ldx + i] += g * y[t * ldy + i];
    }
    return c->rc;
}
int gpu_to_bf16(gpu_ctx *c, uint16_t *d, const float *s, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        d[i] = f32_to_bf16(s[i]);
    return c->rc;
}
int gpu_moe_experts(gpu_ctx *c, const gpu_experts *ex, int T, int K, const float *h, int64_t ldh, const int32_t *ids, const float *w, float *x, int64_t ldx, float *scratch)
{
    const int D = ex->d_model, F = ex->d_ff;
    /* the grouped GEMMs of long passes round h and the activation to BF16 (gpu_moe_grouped.cu) */
    const int exact = !(T > c->exact_max_T && ex->dt == GPU_BF16 && D % 64 == 0 && F % 64 == 0);
    float *g = scratch, *y = scratch + 2 * F;
    for (int t = 0; t < T; t++) {
        float acc[8192] = { 0 };
        int any = 0;
        for (int k = 0; k < K; k++) {
            int s = ids[t * K + k] >= 0 ? ex->slot[ids[t * K + k]] : -1;
            if (s < 0)
                continue;
            gpu_mat gu = { (const char *)ex->gate_up + (size_t)s * 2 * F * D * (ex->dt == GPU_F32 ? 4 : 2), ex->dt, 2 * F, D, NULL, 0 };
            gpu_mat dn = { (const char *)ex->down + (size_t)s * D * F * (ex->dt == GPU_F32 ? 4 : 2), ex->dt, D, F, NULL, 0 };
            mm(c, g, 2 * F, h + t * ldh, D, 1, &gu, NULL, 0, exact);
            gpu_silu_mul(c, g, F, g, 2 * F, 1, F);
            mm(c, y, D, g, F, 1, &dn, NULL, 0, exact);
            for (int d = 0; d < D; d++)
                acc[d] += w[t * K + k] * y[d];
            any = 1;
        }
        if (any)
            for (int d = 0; d < D; d++)
                x[t * ldx + d] += acc[d];
    }
    return c->rc;
}
int gpu_handoff_pack(gpu_ctx *c, const gpu_handoff *ho, const float *h, int T, int D, int K, const int32_t *ids,
                     const float *w)
{
    for (int64_t i = 0; ho->host_x && i < (int64_t)T * D; i++) {
        if (ho->x_bf16)
            ((uint16_t *)ho->host_x)[i] = f32_to_bf16(h[i]);
        else
            ((float *)ho->host_x)[i] = h[i];
    }
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            const int i = t * K + k, e = ids[i];
            int rank = 0;
            for (int j = 0; j < K; j++)
                rank += w[t * K + j] > w[i] || (w[t * K + j] == w[i] && j < k);
            const int def = rank >= K - ho->defer, on_gpu = ho->slot && e >= 0 && ho->slot[e] >= 0;
            if (ho->host_ids)
                ho->host_ids[i] = def || on_gpu ? -1 : e;
            if (ho->host_ids_def)
                ho->host_ids_def[i] = def && !on_gpu ? e : -1;
            if (ho->host_w)
                ho->host_w[i] = w[i];
            if (ho->gpu_ids)
                ho->gpu_ids[i] = def ? -1 : e;
            if (ho->gpu_ids_def)
                ho->gpu_ids_def[i] = def ? e : -1;
        }
    return c->rc;
}
int gpu_moe_gate(gpu_ctx *c, int T, int D, const float *x, const float *norm_w, float eps, float *h,
                 const gpu_mat *router, const gpu_route_params *r, float *logits, int32_t *ids, float *w,
                 const gpu_handoff *ho)
{
    gpu_rmsnorm(c, h, x, T, D, 1, 0, norm_w, D, eps);
    gpu_matmul_exact(c, logits, r->n_expert, h, D, T, router, NULL, 0);
    gpu_route(c, r, T, logits, ids, w);
    return ho ? gpu_handoff_pack(c, ho, h, T, D, r->k, ids, w) : c->rc;
}
int gpu_qkv_prep(gpu_ctx *c, const gpu_qkv_prep_args *a, int T, float *qkv, int64_t ld, const int32_t *seq,
                 const int32_t *pos)
{
    const int H = a->n_head, KH = a->n_kv_head, hd = a->head_dim;
    const int64_t qd = (int64_t)H * hd, kd = (int64_t)KH * hd;
    if (a->q_norm)
        gpu_rmsnorm(c, qkv, qkv, T, ld, H, hd, a->q_norm, hd, a->eps);
    if (a->k_norm)
        gpu_rmsnorm(c, qkv + qd, qkv + qd, T, ld, KH, hd, a->k_norm, hd, a->eps);
    gpu_rope(c, qkv, T, ld, H, hd, 0, a->rope_dim, a->pairs, a->inv_freq, a->rope_scale, pos);
    gpu_rope(c, qkv + qd, T, ld, KH, hd, 0, a->rope_dim, a->pairs, a->inv_freq, a->rope_scale, pos);
    gpu_kv_store(c, a->k_cache, a->seq_stride, a->row_stride, qkv + qd, ld, (int)kd, T, seq, pos);
    return gpu_kv_store(c, a->v_cache, a->seq_stride, a->row_stride, qkv + qd + kd, ld, (int)kd, T, seq, pos);
}
int gpu_add_norm(gpu_ctx *c, float *x, int T, int D, const float *a, const float *b, const float *y, int64_t ld,
                 const float *w, float eps, float *h)
{
    const float *adds[3] = { a, b, y };
    for (int j = 0; j < 3; j++)
        if (adds[j])
            gpu_add_rows(c, x, D, adds[j], ld, T, D, NULL);
    return h ? gpu_rmsnorm(c, h, x, T, D, 1, 0, w, D, eps) : c->rc;
}
void gpu_ctx_set_fast(gpu_ctx *c, int fast) { (void)c, (void)fast; }
struct gpu_timer {
    double a, b;
};
static double emu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
int gpu_timer_create(gpu_timer **out, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    *out = calloc(1, sizeof **out);
    return *out ? 0 : TANDEM_ENOMEM;
}
void gpu_timer_free(gpu_timer *t) { free(t); }
int gpu_timer_start(gpu_ctx *c, gpu_timer *t) { t->a = emu_now(); return c->rc; }
int gpu_timer_stop(gpu_ctx *c, gpu_timer *t) { t->b = emu_now(); return c->rc; }
int gpu_timer_ms(gpu_ctx *c, gpu_timer *t, double *ms) { *ms = t->b - t->a; return c->rc; }
int gpu_graph_count(const gpu_graph *g, gpu_graph_counts *out)
{
    (void)g;
    memset(out, 0, sizeof *out);
    return TANDEM_EGPU;
}
int gpu_add_rows_host(gpu_ctx *c, float *x, int64_t ldx, const float *y, int64_t ldy, int T, int n)
{
    return gpu_add_rows(c, x, ldx, y, ldy, T, n, NULL);
}
