/*
 * gpu_internal.cuh - what the .cu files of src/cuda share: the inside of
 * gpu_ctx, the sticky-error helpers and small device helpers.
 *
 * Every CUDA or cuBLAS call goes through gpu_check()/gpu_blas_check(), and
 * every kernel launch is followed by gpu_launched(): the first failure is
 * kept in the context (code TANDEM_EGPU plus a message naming the op) and
 * all later ops return it without enqueueing. No path exits or aborts.
 */
#ifndef TD_CUDA_GPU_INTERNAL_CUH
#define TD_CUDA_GPU_INTERNAL_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda/gpu.h"
#include "tandem.h"

/* cuBLAS, loaded at run time (dlopen) so that no CUDA library is needed for
 * the binary to start; NULL from gpu_blas() when it cannot be loaded, and
 * then every GEMM runs on our own kernel. */
struct gpu_blas_api {
    cublasStatus_t (*create)(cublasHandle_t *);
    cublasStatus_t (*destroy)(cublasHandle_t);
    cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t);
    cublasStatus_t (*set_workspace)(cublasHandle_t, void *, size_t);
    cublasStatus_t (*set_math_mode)(cublasHandle_t, cublasMath_t);
    cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *,
                              const void *, cudaDataType, int, const void *, cudaDataType, int, const void *, void *,
                              cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    const char *(*status_string)(cublasStatus_t);
};
const gpu_blas_api *gpu_blas(void);

struct gpu_ctx {
    cudaStream_t s[2];           /* GPU_MAIN, GPU_SIDE */
    cudaEvent_t ev_fork, ev_join;
    cublasHandle_t blas;         /* NULL without cuBLAS: GEMMs use our kernel */
    void *blas_ws;               /* cuBLAS workspace: set once so graph capture never allocates */
    size_t blas_ws_bytes;
    __nv_bfloat16 *xbf;          /* [scratch_elems] GEMM inputs rounded to BF16 */
    size_t xbf_elems;
    __nv_bfloat16 *wbf;          /* [wbf_elems] quantised weights dequantised for cuBLAS (gpu_ctx_reserve_dequant) */
    size_t wbf_elems;
    int exact_max_T;
    int capturing;
    int fast;                    /* decode kernels (gpu_ctx_set_fast) */
    int n_sm;                    /* multiprocessors of the device: sizes split grids */
    float *att_part;             /* [GPU_ATT_PART_FLOATS] split-KV attention partials */
    int *counters;               /* [GPU_COUNTERS] zeroed; "last block" counters, reset by that block */
    int rc;                      /* sticky status */
    char msg[512];
};

/* Scratch of the context's split kernels (ops on the main stream only, so
 * one set serves every op in turn). */
enum {
    GPU_ATT_PART_FLOATS = 1 << 20,   /* split-KV attention: (m, l, o[hd]) per split and head */
    GPU_CNT_ATT = 0,                 /* [T * n_kv_head] attention counters */
    GPU_CNT_ATT_N = 4096,
    GPU_CNT_GATE = GPU_CNT_ATT_N,    /* the fused MoE gate */
    GPU_COUNTERS = GPU_CNT_ATT_N + 32
};

/* Record the first failure; returns the sticky code. */
static inline int gpu_fail(gpu_ctx *c, const char *what, const char *why)
{
    if (!c->rc) {
        c->rc = TANDEM_EGPU;
        snprintf(c->msg, sizeof c->msg, "CUDA: %s: %s", what, why);
    }
    return c->rc;
}

static inline int gpu_check(gpu_ctx *c, cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return c->rc;
    char why[256];
    snprintf(why, sizeof why, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    return gpu_fail(c, what, why);
}

static inline int gpu_blas_check(gpu_ctx *c, cublasStatus_t s, const char *what)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return c->rc;
    char why[64];
    snprintf(why, sizeof why, "cuBLAS status %d", (int)s);
    return gpu_fail(c, what, gpu_blas() ? gpu_blas()->status_string(s) : why);
}

/* After a <<<>>> launch: catches bad configurations and earlier async faults. */
static inline int gpu_launched(gpu_ctx *c, const char *what)
{
    return gpu_check(c, cudaGetLastError(), what);
}

static inline int gpu_cdiv(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }
static inline int gpu_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* ---- device helpers ---------------------------------------------------------- */
static __device__ __forceinline__ float gpu_ld(const float *p, int64_t i) { return p[i]; }
static __device__ __forceinline__ float gpu_ld(const __nv_bfloat16 *p, int64_t i) { return __bfloat162float(p[i]); }

static __device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ double warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Block-wide sum of a double (blockDim.x a multiple of 32, <= 1024); every
 * thread gets it. part: shared [32]. Sums the warps in order: deterministic. */
static __device__ __forceinline__ double block_sum_d(double v, double *part)
{
    v = warp_sum_d(v);
    __syncthreads(); /* part may still be read from a previous call */
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = v;
    __syncthreads();
    double s = 0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++)
        s += part[i];
    return s;
}

/* 1 / RMS as gpu_rmsnorm forms it: double sum of squares, fp32 result. */
static __device__ __forceinline__ float gpu_rms_inv(double ss, int n, float eps)
{
    return (float)(1.0 / sqrt(ss / n + (double)eps));
}

static __device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* One weight of a quantised matrix as fp32: the plain dequantisation, as gpu_quant.c's gpu_wq_row_f32
 * (W.data, W.scale on the device). */
static __device__ __forceinline__ float gpu_qw(const gpu_mat &W, int64_t n, int64_t k)
{
    const float s = W.scale[n * ((W.cols + W.group - 1) / W.group) + k / W.group];
    float q;
    if (W.dt == GPU_INT8) {
        q = (float)((const signed char *)W.data)[n * W.cols + k];
    } else if (W.dt == GPU_FP8) {
        const __half_raw h = __nv_cvt_fp8_to_halfraw(((const __nv_fp8_storage_t *)W.data)[n * W.cols + k], __NV_E4M3);
        q = __half2float(*(const __half *)&h);
    } else {
        const unsigned char b = ((const unsigned char *)W.data)[n * ((W.cols + 1) / 2) + k / 2];
        q = (float)((k & 1 ? b >> 4 : b & 15) - 8);
    }
    return q * s;
}

/* Load 8 consecutive weights as fp32 (BF16: one 16-byte load; F32: two). */
static __device__ __forceinline__ void gpu_load8(const __nv_bfloat16 *p, float *w)
{
    uint4 u = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        w[2 * i] = f.x;
        w[2 * i + 1] = f.y;
    }
}

static __device__ __forceinline__ void gpu_load8(const float *p, float *w)
{
    float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w;
    w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
}

/* gpu_moe_grouped.cu: the grouped GEMM path of gpu_moe_experts, and whether a call takes it */
int gpu_moe_grouped_fits(const gpu_ctx *c, const gpu_experts *ex, int T, const float *h, int64_t ldh);
int gpu_moe_grouped(gpu_ctx *c, const gpu_experts *ex, int T, int K, const float *h, int64_t ldh,
                    const int32_t *ids, const float *w, float *x, int64_t ldx, float *scratch);

/* gpu_attn.cu: kernel attributes set once per context */
int gpu_attn_prepare(gpu_ctx *c);

#endif
