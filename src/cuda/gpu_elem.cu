/*
 * gpu_elem.cu - the small per-row ops of the forward pass: embedding,
 * RMSNorm, row gather, rotary embedding, KV-cache stores, SwiGLU and
 * residual adds.
 *
 * They are memory-bound and tiny next to the GEMMs; what matters is that
 * they agree with src/cpu/ops.c: RMSNorm sums squares in double, rope forms
 * its angle in fp32 as pos * inv_freq and takes cos/sin in double, SiLU uses
 * expf. One block per row (or per token and head) keeps them simple.
 */
#include "cuda/gpu_internal.cuh"

/* ---- embedding ------------------------------------------------------------------ */
template <typename WT>
static __global__ void embed_kernel(float *x, const WT *table, const int32_t *tok, int64_t D)
{
    const WT *row = table + (int64_t)tok[blockIdx.x] * D;
    float *out = x + (int64_t)blockIdx.x * D;
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
        out[i] = gpu_ld(row, i);
}

/* a quantised table: each row dequantised as it is gathered */
static __global__ void embed_q_kernel(float *x, gpu_mat table, const int32_t *tok)
{
    float *out = x + (int64_t)blockIdx.x * table.cols;
    for (int64_t i = threadIdx.x; i < table.cols; i += blockDim.x)
        out[i] = gpu_qw(table, tok[blockIdx.x], i);
}

extern "C" int gpu_embed(gpu_ctx *c, float *x, const gpu_mat *table, const int32_t *tok, int T)
{
    if (c->rc || T <= 0)
        return c->rc;
    if (table->dt == GPU_INT8 || table->dt == GPU_INT4 || table->dt == GPU_FP8)
        embed_q_kernel<<<T, 256, 0, c->s[GPU_MAIN]>>>(x, *table, tok);
    else if (table->dt == GPU_BF16)
        embed_kernel<<<T, 256, 0, c->s[GPU_MAIN]>>>(x, (const __nv_bfloat16 *)table->data, tok, table->cols);
    else
        embed_kernel<<<T, 256, 0, c->s[GPU_MAIN]>>>(x, (const float *)table->data, tok, table->cols);
    return gpu_launched(c, "embed");
}

/* ---- RMSNorm --------------------------------------------------------------------- */
enum { NORM_THREADS = 128 };

static __global__ void rmsnorm_kernel(float *y, const float *x, int n_inner, int64_t ld_outer, int64_t ld_inner,
                                      const float *w, int n, float eps)
{
    __shared__ double part[NORM_THREADS / 32];
    __shared__ float r_sh;
    const int64_t off = (int64_t)(blockIdx.x / n_inner) * ld_outer + (int64_t)(blockIdx.x % n_inner) * ld_inner;
    const float *xr = x + off;
    float *yr = y + off;
    double ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ss += (double)xr[i] * xr[i];
    ss = warp_sum_d(ss);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++)
            s += part[i];
        r_sh = (float)(1.0 / sqrt(s / n + (double)eps));
    }
    __syncthreads();
    const float r = r_sh;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = w ? w[i] * (xr[i] * r) : xr[i] * r;
}

extern "C" int gpu_rmsnorm(gpu_ctx *c, float *y, const float *x, int n_outer, int64_t ld_outer, int n_inner,
                           int64_t ld_inner, const float *w, int n, float eps)
{
    if (c->rc || n_outer <= 0 || n_inner <= 0)
        return c->rc;
    int64_t rows = (int64_t)n_outer * n_inner;
    if (rows > INT32_MAX)
        return gpu_fail(c, "rmsnorm", "too many rows");
    int threads = n <= 32 ? 32 : n <= 64 ? 64 : NORM_THREADS;
    rmsnorm_kernel<<<(unsigned)rows, threads, 0, c->s[GPU_MAIN]>>>(y, x, n_inner, ld_outer, ld_inner, w, n, eps);
    return gpu_launched(c, "rmsnorm");
}

/* ---- row gather ----------------------------------------------------------------------- */
static __global__ void gather_kernel(float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *rows,
                                     int width)
{
    const float *s = src + (int64_t)rows[blockIdx.x] * lds;
    float *d = dst + (int64_t)blockIdx.x * ldd;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        d[i] = s[i];
}

extern "C" int gpu_gather_rows(gpu_ctx *c, float *dst, int64_t ldd, const float *src, int64_t lds,
                               const int32_t *rows, int n, int width)
{
    if (c->rc || n <= 0)
        return c->rc;
    gather_kernel<<<n, 256, 0, c->s[GPU_MAIN]>>>(dst, ldd, src, lds, rows, width);
    return gpu_launched(c, "gather rows");
}

/* ---- rotary embedding ----------------------------------------------------------------- */
/* grid (T, n_head); thread i turns pair i. */
static __global__ void rope_kernel(float *x, int64_t ld_tok, int64_t ld_head, int offset, int dim, int pairs,
                                   const float *inv_freq, float scale, const int32_t *pos)
{
    const int half = dim / 2;
    float *h = x + (int64_t)blockIdx.x * ld_tok + (int64_t)blockIdx.y * ld_head + offset;
    const float p = (float)pos[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float ang = __fmul_rn(p, inv_freq[i]); /* fp32, as transformers forms it */
        float cs = (float)cos((double)ang) * scale, sn = (float)sin((double)ang) * scale;
        int a = pairs ? 2 * i : i, b = pairs ? 2 * i + 1 : i + half;
        float x0 = h[a], x1 = h[b];
        h[a] = x0 * cs - x1 * sn;
        h[b] = x1 * cs + x0 * sn;
    }
}

extern "C" int gpu_rope(gpu_ctx *c, float *x, int T, int64_t ld_tok, int n_head, int64_t ld_head, int offset,
                        int dim, int pairs, const float *inv_freq, float scale, const int32_t *pos)
{
    if (c->rc || T <= 0 || n_head <= 0 || dim < 2)
        return c->rc;
    int threads = dim / 2 < 32 ? 32 : dim / 2 > 256 ? 256 : (dim / 2 + 31) / 32 * 32;
    rope_kernel<<<dim3(T, n_head), threads, 0, c->s[GPU_MAIN]>>>(x, ld_tok, ld_head, offset, dim, pairs, inv_freq,
                                                                 scale, pos);
    return gpu_launched(c, "rope");
}

/* ---- KV cache store --------------------------------------------------------------------- */
static __global__ void kv_store_kernel(float *cache, int64_t seq_stride, int64_t row_stride, const float *src,
                                       int64_t ld_src, int width, const int32_t *seq, const int32_t *pos)
{
    const int t = blockIdx.x;
    float *d = cache + (int64_t)seq[t] * seq_stride + (int64_t)pos[t] * row_stride;
    const float *s = src + (int64_t)t * ld_src;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        d[i] = s[i];
}

extern "C" int gpu_kv_store(gpu_ctx *c, float *cache, int64_t seq_stride, int64_t row_stride, const float *src,
                            int64_t ld_src, int width, int T, const int32_t *seq, const int32_t *pos)
{
    if (c->rc || T <= 0)
        return c->rc;
    kv_store_kernel<<<T, 256, 0, c->s[GPU_MAIN]>>>(cache, seq_stride, row_stride, src, ld_src, width, seq, pos);
    return gpu_launched(c, "kv store");
}

/* ---- SwiGLU and residual adds ----------------------------------------------------------- */
static __global__ void silu_mul_kernel(float *out, int64_t ldo, const float *gu, int64_t ldgu, int F)
{
    const float *g = gu + (int64_t)blockIdx.y * ldgu, *u = g + F;
    float *o = out + (int64_t)blockIdx.y * ldo;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < F) {
        float a = g[i];
        o[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

extern "C" int gpu_silu_mul(gpu_ctx *c, float *out, int64_t ldo, const float *gu, int64_t ldgu, int T, int F)
{
    if (c->rc || T <= 0 || F <= 0)
        return c->rc;
    silu_mul_kernel<<<dim3(gpu_cdiv(F, 256), T), 256, 0, c->s[GPU_MAIN]>>>(out, ldo, gu, ldgu, F);
    return gpu_launched(c, "silu_mul");
}

static __global__ void add_rows_kernel(float *x, int64_t ldx, const float *y, int64_t ldy, int n, const float *gate)
{
    const int t = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    float g = gate ? 1.0f / (1.0f + expf(-gate[t])) : 1.0f;
    x[(int64_t)t * ldx + i] += g * y[(int64_t)t * ldy + i];
}

extern "C" int gpu_add_rows(gpu_ctx *c, float *x, int64_t ldx, const float *y, int64_t ldy, int T, int n,
                            const float *gate)
{
    if (c->rc || T <= 0 || n <= 0)
        return c->rc;
    add_rows_kernel<<<dim3(gpu_cdiv(n, 256), T), 256, 0, c->s[GPU_MAIN]>>>(x, ldx, y, ldy, n, gate);
    return gpu_launched(c, "add rows");
}

/* ---- fused decode helpers -------------------------------------------------------------- */
/* q/k prep: grid (T, H + 2 KH), one block per head row of one token with at
 * least head_dim threads (a dim each). q and k heads: RMSNorm (double sum of
 * squares, fp32 result, as rmsnorm_kernel) into shared memory, then rope
 * over the first rope_dim dims (as rope_kernel); k heads also go to the k
 * cache; v heads are only copied to the v cache. */
static __global__ void qkv_prep_kernel(gpu_qkv_prep_args a, float *qkv, int64_t ld, const int32_t *seq,
                                       const int32_t *pos)
{
    __shared__ float v[256];
    __shared__ double part[32];
    const int t = blockIdx.x, slot = blockIdx.y, hd = a.head_dim, i = threadIdx.x;
    const int H = a.n_head, KH = a.n_kv_head;
    const int is_q = slot < H, is_k = !is_q && slot < H + KH;
    float *row = qkv + (int64_t)t * ld + (int64_t)slot * hd; /* q | k | v heads are consecutive rows of hd */
    const int64_t cell = (int64_t)seq[t] * a.seq_stride + (int64_t)pos[t] * a.row_stride;
    if (!is_q && !is_k) {
        if (i < hd)
            a.v_cache[cell + (int64_t)(slot - H - KH) * hd + i] = row[i];
        return;
    }
    const float *nw = is_q ? a.q_norm : a.k_norm;
    float xi = i < hd ? row[i] : 0.0f;
    if (nw) {
        const double ss = block_sum_d(i < hd ? (double)xi * xi : 0.0, part);
        const float r = gpu_rms_inv(ss, hd, a.eps);
        if (i < hd)
            xi = nw[i] * (xi * r);
    }
    if (i < hd)
        v[i] = xi;
    __syncthreads();
    const int half = a.rope_dim / 2;
    float *kc = is_k ? a.k_cache + cell + (int64_t)(slot - H) * hd : nullptr;
    if (i < half) {
        const float ang = __fmul_rn((float)pos[t], a.inv_freq[i]); /* fp32, as transformers forms it */
        const float cs = (float)cos((double)ang) * a.rope_scale, sn = (float)sin((double)ang) * a.rope_scale;
        const int ia = a.pairs ? 2 * i : i, ib = a.pairs ? 2 * i + 1 : i + half;
        const float x0 = v[ia], x1 = v[ib], y0 = x0 * cs - x1 * sn, y1 = x1 * cs + x0 * sn;
        row[ia] = y0;
        row[ib] = y1;
        if (kc) {
            kc[ia] = y0;
            kc[ib] = y1;
        }
    } else if (i >= 2 * half && i < hd) {
        row[i] = v[i];
        if (kc)
            kc[i] = v[i];
    }
}

extern "C" int gpu_qkv_prep(gpu_ctx *c, const gpu_qkv_prep_args *a, int T, float *qkv, int64_t ld,
                            const int32_t *seq, const int32_t *pos)
{
    if (c->rc || T <= 0)
        return c->rc;
    const int H = a->n_head, KH = a->n_kv_head, hd = a->head_dim;
    const int64_t qd = (int64_t)H * hd, kd = (int64_t)KH * hd;
    if (!c->fast || hd > 256 || a->rope_dim > hd || a->rope_dim < 0) {
        if (a->q_norm)
            gpu_rmsnorm(c, qkv, qkv, T, ld, H, hd, a->q_norm, hd, a->eps);
        if (a->k_norm)
            gpu_rmsnorm(c, qkv + qd, qkv + qd, T, ld, KH, hd, a->k_norm, hd, a->eps);
        gpu_rope(c, qkv, T, ld, H, hd, 0, a->rope_dim, a->pairs, a->inv_freq, a->rope_scale, pos);
        gpu_rope(c, qkv + qd, T, ld, KH, hd, 0, a->rope_dim, a->pairs, a->inv_freq, a->rope_scale, pos);
        gpu_kv_store(c, a->k_cache, a->seq_stride, a->row_stride, qkv + qd, ld, (int)kd, T, seq, pos);
        gpu_kv_store(c, a->v_cache, a->seq_stride, a->row_stride, qkv + qd + kd, ld, (int)kd, T, seq, pos);
        return c->rc;
    }
    const int threads = hd <= 32 ? 32 : (hd + 31) / 32 * 32;
    qkv_prep_kernel<<<dim3(T, H + 2 * KH), threads, 0, c->s[GPU_MAIN]>>>(*a, qkv, ld, seq, pos);
    return gpu_launched(c, "q/k norm, rope and KV store");
}

/* add + norm: one block of AN_THREADS per token; each thread holds up to
 * AN_PER dims, so the loads from pinned host memory (PCIe round trips) of a
 * row are all issued before the first is used. */
enum { AN_THREADS = 1024, AN_PER = 8 };

static __global__ void __launch_bounds__(AN_THREADS)
    add_norm_kernel(float *x, int D, const float *a, const float *b, const float *y, int64_t ld, const float *w,
                    float eps, float *h)
{
    __shared__ double part[32];
    const int t = blockIdx.x;
    float *xr = x + (int64_t)t * D;
    float v[AN_PER];
    double ss = 0;
#pragma unroll
    for (int j = 0; j < AN_PER; j++) {
        const int i = threadIdx.x + j * AN_THREADS;
        v[j] = i < D ? xr[i] : 0.0f;
    }
    if (a) {
        float u[AN_PER];
#pragma unroll
        for (int j = 0; j < AN_PER; j++) {
            const int i = threadIdx.x + j * AN_THREADS;
            u[j] = i < D ? __ldcv(a + (int64_t)t * ld + i) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < AN_PER; j++)
            v[j] += u[j];
    }
    if (b) {
        float u[AN_PER];
#pragma unroll
        for (int j = 0; j < AN_PER; j++) {
            const int i = threadIdx.x + j * AN_THREADS;
            u[j] = i < D ? __ldcv(b + (int64_t)t * ld + i) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < AN_PER; j++)
            v[j] += u[j];
    }
    if (y) {
#pragma unroll
        for (int j = 0; j < AN_PER; j++) {
            const int i = threadIdx.x + j * AN_THREADS;
            if (i < D)
                v[j] += y[(int64_t)t * ld + i];
        }
    }
#pragma unroll
    for (int j = 0; j < AN_PER; j++) {
        const int i = threadIdx.x + j * AN_THREADS;
        if (i < D) {
            xr[i] = v[j];
            ss += (double)v[j] * v[j];
        }
    }
    if (!h)
        return;
    ss = block_sum_d(ss, part);
    const float r = gpu_rms_inv(ss, D, eps);
#pragma unroll
    for (int j = 0; j < AN_PER; j++) {
        const int i = threadIdx.x + j * AN_THREADS;
        if (i < D)
            h[(int64_t)t * D + i] = w ? w[i] * (v[j] * r) : v[j] * r;
    }
}

extern "C" int gpu_add_norm(gpu_ctx *c, float *x, int T, int D, const float *a_host, const float *b_host,
                            const float *y, int64_t ld_add, const float *w, float eps, float *h)
{
    if (c->rc || T <= 0 || D <= 0)
        return c->rc;
    if (!c->fast || D > AN_THREADS * AN_PER) {
        if (a_host)
            gpu_add_rows_host(c, x, D, a_host, ld_add, T, D);
        if (b_host)
            gpu_add_rows_host(c, x, D, b_host, ld_add, T, D);
        if (y)
            gpu_add_rows(c, x, D, y, ld_add, T, D, NULL);
        if (h)
            gpu_rmsnorm(c, h, x, T, D, 1, 0, w, D, eps);
        return c->rc;
    }
    add_norm_kernel<<<T, AN_THREADS, 0, c->s[GPU_MAIN]>>>(x, D, a_host, b_host, y, ld_add, w, eps, h);
    return gpu_launched(c, "residual add and RMSNorm");
}
