/*
 * gpu_none.c - the CUDA backend of a build without CUDA (`make cpu`).
 *
 * Every entry of gpu.h exists so the runtime links unchanged; there is no
 * device (gpu_device_count() is 0, with the reason), opening one or making a
 * context fails with "built without CUDA", and ops return TANDEM_EGPU. No
 * context can exist in this build, so the ops are never reached in practice.
 */
#include "cuda/gpu.h"
#include "core/err.h"

#include <stdio.h>

#define NO_CUDA "built without CUDA (rebuild with nvcc on PATH, not `make cpu`)"

int gpu_device_count(char *why, size_t whylen)
{
    if (why && whylen)
        snprintf(why, whylen, "%s", NO_CUDA);
    return 0;
}

int gpu_open(int device, gpu_info *info, char *err, size_t errlen)
{
    (void)device;
    (void)info;
    return td_err(err, errlen, TANDEM_EGPU, "no CUDA device: %s", NO_CUDA);
}

int gpu_use_device(int device, char *err, size_t errlen)
{
    (void)device;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

int gpu_mem_info(size_t *free_bytes, size_t *total_bytes, char *err, size_t errlen)
{
    *free_bytes = *total_bytes = 0;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

int gpu_alloc(void **p, size_t bytes, char *err, size_t errlen)
{
    (void)bytes;
    *p = NULL;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

void gpu_free(void *p) { (void)p; }

int gpu_host_alloc(void **p, size_t bytes, char *err, size_t errlen)
{
    (void)bytes;
    *p = NULL;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

void gpu_host_free(void *p) { (void)p; }

int gpu_host_register(void *p, size_t bytes, char *err, size_t errlen)
{
    (void)p, (void)bytes;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

void gpu_host_unregister(void *p) { (void)p; }

int gpu_upload(void *dst, const void *src, size_t bytes, char *err, size_t errlen)
{
    (void)dst, (void)src, (void)bytes;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

int gpu_download(void *dst, const void *src, size_t bytes, char *err, size_t errlen)
{
    (void)dst, (void)src, (void)bytes;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

int gpu_memset(void *dst, int value, size_t bytes, char *err, size_t errlen)
{
    (void)dst, (void)value, (void)bytes;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

int gpu_ctx_create(gpu_ctx **out, size_t scratch_elems, char *err, size_t errlen)
{
    (void)scratch_elems;
    *out = NULL;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

void gpu_ctx_free(gpu_ctx *c) { (void)c; }

int gpu_ctx_status(const gpu_ctx *c, char *err, size_t errlen)
{
    (void)c;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

void gpu_ctx_clear(gpu_ctx *c) { (void)c; }
int gpu_sync(gpu_ctx *c, char *err, size_t errlen) { return gpu_ctx_status(c, err, errlen); }
void gpu_ctx_set_exact(gpu_ctx *c, int max_T) { (void)c, (void)max_T; }
int gpu_ctx_reserve_dequant(gpu_ctx *c, size_t elems, char *err, size_t errlen)
{
    (void)c, (void)elems;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

/* Context-bound calls: unreachable without a context; all say the same. */
int gpu_copy(gpu_ctx *c, int stream, void *dst, const void *src, size_t bytes)
{
    (void)c, (void)stream, (void)dst, (void)src, (void)bytes;
    return TANDEM_EGPU;
}

int gpu_zero(gpu_ctx *c, int stream, void *dst, size_t bytes)
{
    (void)c, (void)stream, (void)dst, (void)bytes;
    return TANDEM_EGPU;
}

int gpu_fork(gpu_ctx *c)
{
    (void)c;
    return TANDEM_EGPU;
}

int gpu_join(gpu_ctx *c)
{
    (void)c;
    return TANDEM_EGPU;
}

int gpu_host_fn(gpu_ctx *c, int stream, void (*fn)(void *), void *arg)
{
    (void)c, (void)stream, (void)fn, (void)arg;
    return TANDEM_EGPU;
}

int gpu_flag_write(gpu_ctx *c, int stream, uint32_t *flag, uint32_t value)
{
    (void)c, (void)stream, (void)flag, (void)value;
    return TANDEM_EGPU;
}

int gpu_flag_wait(gpu_ctx *c, int stream, uint32_t *flag, uint32_t value)
{
    (void)c, (void)stream, (void)flag, (void)value;
    return TANDEM_EGPU;
}

int gpu_capture_begin(gpu_ctx *c)
{
    (void)c;
    return TANDEM_EGPU;
}

int gpu_capture_end(gpu_ctx *c, gpu_graph **out)
{
    (void)c;
    *out = NULL;
    return TANDEM_EGPU;
}

int gpu_graph_launch(gpu_ctx *c, gpu_graph *g)
{
    (void)c, (void)g;
    return TANDEM_EGPU;
}

void gpu_graph_free(gpu_graph *g) { (void)g; }

int gpu_matmul(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
               const float *bias, int accumulate)
{
    (void)c, (void)y, (void)ldy, (void)x, (void)ldx, (void)T, (void)W, (void)bias, (void)accumulate;
    return TANDEM_EGPU;
}

int gpu_matmul_exact(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                     const float *bias, int accumulate)
{
    return gpu_matmul(c, y, ldy, x, ldx, T, W, bias, accumulate);
}

int gpu_embed(gpu_ctx *c, float *x, const gpu_mat *table, const int32_t *tok, int T)
{
    (void)c, (void)x, (void)table, (void)tok, (void)T;
    return TANDEM_EGPU;
}

int gpu_rmsnorm(gpu_ctx *c, float *y, const float *x, int n_outer, int64_t ld_outer, int n_inner, int64_t ld_inner,
                const float *w, int n, float eps)
{
    (void)c, (void)y, (void)x, (void)n_outer, (void)ld_outer, (void)n_inner, (void)ld_inner, (void)w, (void)n,
        (void)eps;
    return TANDEM_EGPU;
}

int gpu_gather_rows(gpu_ctx *c, float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *rows,
                    int n, int width)
{
    (void)c, (void)dst, (void)ldd, (void)src, (void)lds, (void)rows, (void)n, (void)width;
    return TANDEM_EGPU;
}

int gpu_rope(gpu_ctx *c, float *x, int T, int64_t ld_tok, int n_head, int64_t ld_head, int offset, int dim,
             int pairs, const float *inv_freq, float scale, const int32_t *pos)
{
    (void)c, (void)x, (void)T, (void)ld_tok, (void)n_head, (void)ld_head, (void)offset, (void)dim, (void)pairs,
        (void)inv_freq, (void)scale, (void)pos;
    return TANDEM_EGPU;
}

int gpu_kv_store(gpu_ctx *c, float *cache, int64_t seq_stride, int64_t row_stride, const float *src, int64_t ld_src,
                 int width, int T, const int32_t *seq, const int32_t *pos)
{
    (void)c, (void)cache, (void)seq_stride, (void)row_stride, (void)src, (void)ld_src, (void)width, (void)T,
        (void)seq, (void)pos;
    return TANDEM_EGPU;
}

int gpu_attn_gqa(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                 const int32_t *pos, float *out, int64_t ldo)
{
    (void)c, (void)a, (void)T, (void)q, (void)ldq, (void)seq, (void)pos, (void)out, (void)ldo;
    return TANDEM_EGPU;
}

int gpu_attn_mla(gpu_ctx *c, const gpu_mla *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                 const int32_t *pos, float *out, int64_t ldo, float *scratch)
{
    (void)c, (void)a, (void)T, (void)q, (void)ldq, (void)seq, (void)pos, (void)out, (void)ldo, (void)scratch;
    return TANDEM_EGPU;
}

int gpu_route(gpu_ctx *c, const gpu_route_params *r, int T, const float *logits, int32_t *ids, float *w)
{
    (void)c, (void)r, (void)T, (void)logits, (void)ids, (void)w;
    return TANDEM_EGPU;
}

int gpu_silu_mul(gpu_ctx *c, float *out, int64_t ldo, const float *gu, int64_t ldgu, int T, int F)
{
    (void)c, (void)out, (void)ldo, (void)gu, (void)ldgu, (void)T, (void)F;
    return TANDEM_EGPU;
}

int gpu_add_rows(gpu_ctx *c, float *x, int64_t ldx, const float *y, int64_t ldy, int T, int n, const float *gate)
{
    (void)c, (void)x, (void)ldx, (void)y, (void)ldy, (void)T, (void)n, (void)gate;
    return TANDEM_EGPU;
}

int gpu_to_bf16(gpu_ctx *c, uint16_t *dst, const float *src, int64_t n)
{
    (void)c, (void)dst, (void)src, (void)n;
    return TANDEM_EGPU;
}

int gpu_moe_experts(gpu_ctx *c, const gpu_experts *ex, int T, int K, const float *h, int64_t ldh,
                    const int32_t *ids, const float *w, float *x, int64_t ldx, float *scratch)
{
    (void)c, (void)ex, (void)T, (void)K, (void)h, (void)ldh, (void)ids, (void)w, (void)x, (void)ldx, (void)scratch;
    return TANDEM_EGPU;
}

int gpu_handoff_pack(gpu_ctx *c, const gpu_handoff *ho, const float *h, int T, int D, int K, const int32_t *ids,
                     const float *w)
{
    (void)c, (void)ho, (void)h, (void)T, (void)D, (void)K, (void)ids, (void)w;
    return TANDEM_EGPU;
}

int gpu_moe_gate(gpu_ctx *c, int T, int D, const float *x, const float *norm_w, float eps, float *h,
                 const gpu_mat *router, const gpu_route_params *r, float *logits, int32_t *ids, float *w,
                 const gpu_handoff *ho)
{
    (void)c, (void)T, (void)D, (void)x, (void)norm_w, (void)eps, (void)h, (void)router, (void)r, (void)logits,
        (void)ids, (void)w, (void)ho;
    return TANDEM_EGPU;
}

int gpu_qkv_prep(gpu_ctx *c, const gpu_qkv_prep_args *a, int T, float *qkv, int64_t ld, const int32_t *seq,
                 const int32_t *pos)
{
    (void)c, (void)a, (void)T, (void)qkv, (void)ld, (void)seq, (void)pos;
    return TANDEM_EGPU;
}

int gpu_add_norm(gpu_ctx *c, float *x, int T, int D, const float *a_host, const float *b_host, const float *y,
                 int64_t ld_add, const float *w, float eps, float *h)
{
    (void)c, (void)x, (void)T, (void)D, (void)a_host, (void)b_host, (void)y, (void)ld_add, (void)w, (void)eps, (void)h;
    return TANDEM_EGPU;
}

void gpu_ctx_set_fast(gpu_ctx *c, int fast) { (void)c, (void)fast; }

int gpu_timer_create(gpu_timer **out, char *err, size_t errlen)
{
    *out = NULL;
    return td_err(err, errlen, TANDEM_EGPU, "%s", NO_CUDA);
}

void gpu_timer_free(gpu_timer *t) { (void)t; }

int gpu_timer_start(gpu_ctx *c, gpu_timer *t)
{
    (void)c, (void)t;
    return TANDEM_EGPU;
}

int gpu_timer_stop(gpu_ctx *c, gpu_timer *t)
{
    (void)c, (void)t;
    return TANDEM_EGPU;
}

int gpu_timer_ms(gpu_ctx *c, gpu_timer *t, double *ms)
{
    (void)c, (void)t;
    *ms = 0;
    return TANDEM_EGPU;
}

int gpu_graph_count(const gpu_graph *g, gpu_graph_counts *out)
{
    (void)g;
    out->kernels = out->mem = out->host = out->total = 0;
    return TANDEM_EGPU;
}

int gpu_add_rows_host(gpu_ctx *c, float *x, int64_t ldx, const float *y_host, int64_t ldy, int T, int n)
{
    (void)c, (void)x, (void)ldx, (void)y_host, (void)ldy, (void)T, (void)n;
    return TANDEM_EGPU;
}
