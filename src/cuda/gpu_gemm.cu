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

/* The decode GEMV: grid (row blocks, ceil(T / TT)), GV_THREADS threads. */
template <typename WT, int TT>
static __global__ void __launch_bounds__(GV_THREADS, 2)
    mm_dec_kernel(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const WT *W, int64_t N, int64_t K,
                  const float *bias, int accumulate, int KS)
{
    __shared__ float red[GV_WARPS * GV_RPW * TT], res[GV_WARPS * GV_RPW * TT];
    const int t0 = blockIdx.y * TT, nt = T - t0 < TT ? T - t0 : TT;
    const int rows = (GV_WARPS / KS) * GV_RPW;
    const int64_t row0 = (int64_t)blockIdx.x * rows;
    gv_block<WT, TT, false>(W, N, K, row0, KS, x + (int64_t)t0 * ldx, ldx, nt, nullptr, nullptr, red, res);
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
    mm_dec_kernel<WT, TT><<<dim3(bx, gpu_cdiv(T, TT)), GV_THREADS, 0, c->s[GPU_MAIN]>>>(
        y, ldy, x, ldx, T, (const WT *)W->data, W->rows, W->cols, bias, accumulate, KS);
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

static int mm_exact(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                    const float *bias, int accumulate)
{
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

extern "C" int gpu_matmul(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                          const float *bias, int accumulate)
{
    if (c->rc || T <= 0 || W->rows <= 0)
        return c->rc;
    if (T <= c->exact_max_T || !c->blas)
        return mm_exact(c, y, ldy, x, ldx, T, W, bias, accumulate);
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
