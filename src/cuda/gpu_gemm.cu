/*
 * gpu_gemm.cu - y (+)= x . W^T for the dense projections, two paths.
 *
 *   exact (T <= ctx->exact_max_T, the decode sizes): our kernels, fp32
 *     activations and fp32 sums. For T <= 16 with 16-byte aligned rows, the
 *     decode GEMV of gpu_gemv.cuh (split-K across the warps of a block,
 *     2 rows per warp, 8 loads of 16 bytes in flight per lane); otherwise
 *     (and with gpu_ctx_set_fast(0)) the first kernel: one warp per weight
 *     row and up to 8 tokens per pass, one 16-byte load in flight per lane,
 *     which measured ~1.5 TB/s for the Qwen3 o projection (bench/e2e.md).
 *     This is the bandwidth-bound regime, where a GEMV near the HBM roofline
 *     is what matters and tensor cores do not help.
 *   cuBLAS (larger T, prefill; loaded at run time, and when it is missing
 *     the exact kernel serves every T): BF16 weights take the activations rounded
 *     to BF16 (into the context's scratch) and accumulate in fp32 on tensor
 *     cores; F32 weights run a plain fp32 GEMM (no TF32).
 *
 * Quantised weights (INT8 / INT4 / FP8 with group scales, gpu.h): the
 *   decode GEMV of gpu_gemv.cuh reads the packed chunks and dequantises in
 *   registers, for any T when cuBLAS is not there; above exact_max_T, row
 *   tiles of W are dequantised to BF16 into the context's weight scratch and
 *   each tile is a cuBLAS BF16 GEMM (the tensor cores of every architecture;
 *   the weights cross HBM twice more than they would in a fused kernel, a
 *   small cost once T is large enough to be compute-bound). Shapes the GEMV
 *   does not take (K not a multiple of the chunk) run mm_q_kernel, a warp
 *   per row reading one weight at a time: the plain twin of both.
 *
 * Row-major y[T][N] = x[T][K] . W[N][K]^T is, in cuBLAS's column-major
 * terms, Y(NxT) = op_T(W as KxN) . X(KxT): transa = T, lda = K, ldb = ldx.
 */
#include "cuda/gpu_gemv.cuh"

enum { MM_WARPS = 8, MM_TT = 8 };

/* grid (ceil(N / MM_WARPS), ceil(T / MM_TT)), block 32 * MM_WARPS.
 * vec: K % 8 == 0 and every row / x row starts 16-byte aligned. */
template <typename WT>
static __global__ void mm_exact_kernel(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const WT *W,
                                       int64_t N, int64_t K, const float *bias, int accumulate, int vec)
{
    const int lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    const int t0 = blockIdx.y * MM_TT;
    if (n >= N)
        return;
    const int nt = T - t0 < MM_TT ? T - t0 : MM_TT;
    const WT *w = W + n * K;
    float acc[MM_TT];
#pragma unroll
    for (int i = 0; i < MM_TT; i++)
        acc[i] = 0.0f;
    if (vec) {
        for (int64_t k = (int64_t)lane * 8; k < K; k += 256) {
            float wv[8];
            gpu_load8(w + k, wv);
#pragma unroll
            for (int i = 0; i < MM_TT; i++) {
                if (i < nt) {
                    const float *xt = x + (int64_t)(t0 + i) * ldx + k;
                    float4 a = *(const float4 *)xt, b = *(const float4 *)(xt + 4);
                    acc[i] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * b.x + wv[5] * b.y +
                              wv[6] * b.z + wv[7] * b.w;
                }
            }
        }
    } else {
        for (int64_t k = lane; k < K; k += 32) {
            float wk = gpu_ld(w, k);
#pragma unroll
            for (int i = 0; i < MM_TT; i++)
                if (i < nt)
                    acc[i] += wk * x[(int64_t)(t0 + i) * ldx + k];
        }
    }
#pragma unroll
    for (int i = 0; i < MM_TT; i++) {
        float s = warp_sum(acc[i]);
        if (lane == 0 && i < nt) {
            float *yt = y + (int64_t)(t0 + i) * ldy + n;
            if (bias)
                s += bias[n];
            *yt = accumulate ? *yt + s : s;
        }
    }
}

/* Quantised weights, any shape: grid (ceil(N / MM_WARPS), ceil(T / MM_TT)), a warp per row. */
static __global__ void mm_q_kernel(float *y, int64_t ldy, const float *x, int64_t ldx, int T, gpu_mat W,
                                   const float *bias, int accumulate)
{
    const int lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * MM_WARPS + (threadIdx.x >> 5);
    const int t0 = blockIdx.y * MM_TT;
    if (n >= W.rows)
        return;
    const int nt = T - t0 < MM_TT ? T - t0 : MM_TT;
    float acc[MM_TT];
#pragma unroll
    for (int i = 0; i < MM_TT; i++)
        acc[i] = 0.0f;
    for (int64_t k = lane; k < W.cols; k += 32) {
        const float wk = gpu_qw(W, n, k);
#pragma unroll
        for (int i = 0; i < MM_TT; i++)
            if (i < nt)
                acc[i] += wk * x[(int64_t)(t0 + i) * ldx + k];
    }
#pragma unroll
    for (int i = 0; i < MM_TT; i++) {
        float s = warp_sum(acc[i]);
        if (lane == 0 && i < nt) {
            float *yt = y + (int64_t)(t0 + i) * ldy + n;
            if (bias)
                s += bias[n];
            *yt = accumulate ? *yt + s : s;
        }
    }
}

/* dst[r][k] = bf16(W[n0 + r][k]) for rows r < nt: a tile for cuBLAS */
static __global__ void mm_dequant_kernel(__nv_bfloat16 *dst, gpu_mat W, int64_t n0, int64_t nt)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nt * W.cols)
        return;
    dst[i] = __float2bfloat16_rn(gpu_qw(W, n0 + i / W.cols, i % W.cols));
}

/* The decode GEMV: grid (row blocks, ceil(T / TT)), GV_THREADS threads. */
template <typename WT, int TT>
static __global__ void __launch_bounds__(GV_THREADS, 2)
    mm_dec_kernel(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const WT *W, int64_t N, int64_t K,
                  const float *bias, int accumulate, int KS, gv_scales qs)
{
    __shared__ float red[GV_WARPS * GV_RPW * TT], res[GV_WARPS * GV_RPW * TT];
    const int t0 = blockIdx.y * TT, nt = T - t0 < TT ? T - t0 : TT;
    const int rows = (GV_WARPS / KS) * GV_RPW;
    const int64_t row0 = (int64_t)blockIdx.x * rows;
    gv_block<WT, TT, false>(W, N, K, row0, KS, x + (int64_t)t0 * ldx, ldx, nt, nullptr, nullptr, red, res, qs);
    for (int i = threadIdx.x; i < rows * TT; i += blockDim.x) {
        const int64_t n = row0 + i / TT;
        const int t = i % TT;
        if (n < N && t < nt) {
            float s = res[i];
            if (bias)
                s += bias[n];
            float *yt = y + (int64_t)(t0 + t) * ldy + n;
            *yt = accumulate ? *yt + s : s;
        }
    }
}

template <typename WT, int TT>
static void mm_dec_launch(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                          const float *bias, int accumulate)
{
    int bx;
    const int KS = gv_plan(W->rows, W->cols, gv_chunk<WT>::N, gpu_cdiv(T, TT), c->n_sm, &bx);
    const gv_scales qs = { W->scale, W->group > 0 ? (W->cols + W->group - 1) / W->group : 0,
                           W->group > 0 ? W->group : 1 };
    mm_dec_kernel<WT, TT><<<dim3(bx, gpu_cdiv(T, TT)), GV_THREADS, 0, c->s[GPU_MAIN]>>>(
        y, ldy, x, ldx, T, (const WT *)W->data, W->rows, W->cols, bias, accumulate, KS, qs);
}

template <typename WT>
static void mm_dec(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                   const float *bias, int accumulate)
{
    if (T <= 1)
        mm_dec_launch<WT, 1>(c, y, ldy, x, ldx, T, W, bias, accumulate);
    else if (T <= 2)
        mm_dec_launch<WT, 2>(c, y, ldy, x, ldx, T, W, bias, accumulate);
    else if (T <= 4)
        mm_dec_launch<WT, 4>(c, y, ldy, x, ldx, T, W, bias, accumulate);
    else
        mm_dec_launch<WT, 8>(c, y, ldy, x, ldx, T, W, bias, accumulate);
}

/* dst[t][k] = bf16(x[t][k]), packed rows of K */
static __global__ void to_bf16_rows_kernel(__nv_bfloat16 *dst, const float *x, int64_t ldx, int T, int64_t K)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)T * K)
        return;
    int64_t t = i / K, k = i % K;
    dst[i] = __float2bfloat16_rn(x[t * ldx + k]);
}

static __global__ void add_bias_kernel(float *y, int64_t ldy, int T, int64_t N, const float *bias)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)T * N)
        return;
    y[(i / N) * ldy + i % N] += bias[i % N];
}

static int quantised(const gpu_mat *W) { return W->dt == GPU_INT8 || W->dt == GPU_INT4 || W->dt == GPU_FP8; }

/* Quantised W at any T: the decode GEMV where the shape allows (T tiles of 8), else mm_q_kernel. */
static int mm_quant(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                    const float *bias, int accumulate)
{
    const int cn = W->dt == GPU_INT4 ? 32 : 16;
    const int vec = W->cols % cn == 0 && W->group % cn == 0 && ldx % 4 == 0 && gpu_aligned16(x) &&
                    gpu_aligned16(W->data);
    if (vec && c->fast) {
        if (W->dt == GPU_INT8)
            mm_dec<gv_i8>(c, y, ldy, x, ldx, T, W, bias, accumulate);
        else if (W->dt == GPU_INT4)
            mm_dec<gv_i4>(c, y, ldy, x, ldx, T, W, bias, accumulate);
        else
            mm_dec<gv_f8>(c, y, ldy, x, ldx, T, W, bias, accumulate);
        return gpu_launched(c, "matmul (quantised decode kernel)");
    }
    dim3 grid(gpu_cdiv(W->rows, MM_WARPS), gpu_cdiv(T, MM_TT));
    mm_q_kernel<<<grid, 32 * MM_WARPS, 0, c->s[GPU_MAIN]>>>(y, ldy, x, ldx, T, *W, bias, accumulate);
    return gpu_launched(c, "matmul (quantised plain kernel)");
}

static int mm_exact(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                    const float *bias, int accumulate)
{
    if (quantised(W))
        return mm_quant(c, y, ldy, x, ldx, T, W, bias, accumulate);
    int esz = W->dt == GPU_BF16 ? 2 : 4;
    int vec = W->cols % 8 == 0 && ldx % 4 == 0 && gpu_aligned16(x) && gpu_aligned16(W->data) &&
              (W->cols * esz) % 16 == 0;
    if (vec && c->fast && T <= 16) {
        if (W->dt == GPU_BF16)
            mm_dec<__nv_bfloat16>(c, y, ldy, x, ldx, T, W, bias, accumulate);
        else
            mm_dec<float>(c, y, ldy, x, ldx, T, W, bias, accumulate);
        return gpu_launched(c, "matmul (decode kernel)");
    }
    dim3 grid(gpu_cdiv(W->rows, MM_WARPS), gpu_cdiv(T, MM_TT));
    if (W->dt == GPU_BF16)
        mm_exact_kernel<__nv_bfloat16><<<grid, 32 * MM_WARPS, 0, c->s[GPU_MAIN]>>>(
            y, ldy, x, ldx, T, (const __nv_bfloat16 *)W->data, W->rows, W->cols, bias, accumulate, vec);
    else
        mm_exact_kernel<float><<<grid, 32 * MM_WARPS, 0, c->s[GPU_MAIN]>>>(
            y, ldy, x, ldx, T, (const float *)W->data, W->rows, W->cols, bias, accumulate, vec);
    return gpu_launched(c, "matmul (exact kernel)");
}

static int mm_blas(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                   const float *bias, int accumulate)
{
    const int64_t N = W->rows, K = W->cols;
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    if (N > INT32_MAX || K > INT32_MAX || ldx > INT32_MAX || ldy > INT32_MAX)
        return gpu_fail(c, "matmul", "a dimension exceeds cuBLAS's 32-bit sizes");
    cudaStream_t s = c->s[GPU_MAIN];
    if (W->dt == GPU_BF16) {
        if ((size_t)T * (size_t)K > c->xbf_elems) {
            char why[160];
            snprintf(why, sizeof why, "GEMM scratch holds %zu elements, this call needs %lld x %lld", c->xbf_elems,
                     (long long)T, (long long)K);
            return gpu_fail(c, "matmul", why);
        }
        int64_t n = (int64_t)T * K;
        to_bf16_rows_kernel<<<gpu_cdiv(n, 256), 256, 0, s>>>(c->xbf, x, ldx, T, K);
        if (gpu_launched(c, "matmul: rounding inputs to BF16"))
            return c->rc;
        gpu_blas_check(c,
                       gpu_blas()->gemm_ex(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, T, (int)K, &one, W->data,
                                    CUDA_R_16BF, (int)K, c->xbf, CUDA_R_16BF, (int)K, &beta, y, CUDA_R_32F, (int)ldy,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmEx (BF16)");
    } else {
        gpu_blas_check(c,
                       gpu_blas()->gemm_ex(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, T, (int)K, &one, W->data,
                                    CUDA_R_32F, (int)K, x, CUDA_R_32F, (int)ldx, &beta, y, CUDA_R_32F, (int)ldy,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmEx (F32)");
    }
    if (bias && !c->rc) {
        add_bias_kernel<<<gpu_cdiv((int64_t)T * N, 256), 256, 0, s>>>(y, ldy, T, N, bias);
        gpu_launched(c, "matmul: bias");
    }
    return c->rc;
}

/* Quantised W above the decode sizes: row tiles dequantised to BF16 in the
 * weight scratch, each a cuBLAS GEMM into its columns of y. Without the
 * scratch (or a row wider than it) the decode kernels serve. */
static int mm_qblas(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                    const float *bias, int accumulate)
{
    const int64_t K = W->cols;
    if (!c->wbf || (size_t)K > c->wbf_elems)
        return mm_quant(c, y, ldy, x, ldx, T, W, bias, accumulate);
    const int64_t tile = (int64_t)(c->wbf_elems / (size_t)K);
    for (int64_t n0 = 0; n0 < W->rows && !c->rc; n0 += tile) {
        const int64_t nt = W->rows - n0 < tile ? W->rows - n0 : tile;
        mm_dequant_kernel<<<gpu_cdiv(nt * K, 256), 256, 0, c->s[GPU_MAIN]>>>(c->wbf, *W, n0, nt);
        if (gpu_launched(c, "matmul: dequantising a weight tile"))
            break;
        const gpu_mat Wt = { c->wbf, GPU_BF16, nt, K, nullptr, 0 };
        mm_blas(c, y + n0, ldy, x, ldx, T, &Wt, bias ? bias + n0 : nullptr, accumulate);
    }
    return c->rc;
}

extern "C" int gpu_matmul(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                          const float *bias, int accumulate)
{
    if (c->rc || T <= 0 || W->rows <= 0)
        return c->rc;
    if (T <= c->exact_max_T || !c->blas)
        return mm_exact(c, y, ldy, x, ldx, T, W, bias, accumulate);
    if (quantised(W))
        return mm_qblas(c, y, ldy, x, ldx, T, W, bias, accumulate);
    return mm_blas(c, y, ldy, x, ldx, T, W, bias, accumulate);
}

extern "C" int gpu_matmul_exact(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T,
                                const gpu_mat *W, const float *bias, int accumulate)
{
    if (c->rc || T <= 0 || W->rows <= 0)
        return c->rc;
    return mm_exact(c, y, ldy, x, ldx, T, W, bias, accumulate);
}

static __global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        dst[i] = __float2bfloat16_rn(src[i]);
}

extern "C" int gpu_to_bf16(gpu_ctx *c, uint16_t *dst, const float *src, int64_t n)
{
    if (c->rc || n <= 0)
        return c->rc;
    to_bf16_kernel<<<gpu_cdiv(n, 256), 256, 0, c->s[GPU_MAIN]>>>((__nv_bfloat16 *)dst, src, n);
    return gpu_launched(c, "to_bf16");
}
