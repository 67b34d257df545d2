/*
 * gpu_gemv.cuh - the decode GEMV body, shared by gpu_gemm.cu (gpu_matmul for
 * T <= 16) and gpu_router.cu (the fused MoE gate).
 *
 * One block computes res[r][t] = sum_k W[row0 + r][k] * a[t][k] for its
 * rows r and the nt <= TT tokens of its tile, where a is x itself or, with
 * NORM, the RMSNorm of x formed on the fly: a = nw[k] * (x[t][k] * rs[t]),
 * the fp32 formula of gpu_rmsnorm (rs[t] = 1/RMS, computed by the caller).
 *
 * Why it looks like this: at 1-16 tokens a projection reads each weight
 * once, so its floor is weight bytes / HBM bandwidth (~4.3 TB/s on the H200)
 * and the enemy is too few bytes in flight. So:
 *   - the unit of work is a 16-byte chunk of a weight row (8 BF16 or 4 F32);
 *     lane l of the ks-th warp of a row group takes chunks ks*32 + l,
 *     + 32*KS, ... (512 contiguous bytes per warp and step: coalesced);
 *   - GV_UNROLL chunks of each of the GV_RPW rows of the group are loaded
 *     before any is used: GV_UNROLL * GV_RPW 16-byte loads in flight per
 *     lane (the first kernel had one);
 *   - KS warps split one row group's K (split-K inside the block) when rows
 *     are few or long, so a router of 128 rows still spreads over 64 blocks;
 *     the KS partial sums meet in shared memory in a fixed order, so the
 *     result does not depend on timing;
 *   - weights load with ld.global.nc.L1::no_allocate (read once: L1 stays
 *     for the activations, which every warp of the block re-reads).
 * A block covers (GV_WARPS / KS) * GV_RPW rows; rows past N are clamped to
 * row N - 1 for the loads (valid memory) and their results never written.
 * Requirements (checked by the callers): K a multiple of the chunk length;
 * W, x, nw 16-byte aligned; ldx a multiple of 4.
 */
#ifndef TD_CUDA_GPU_GEMV_CUH
#define TD_CUDA_GPU_GEMV_CUH

#include "cuda/gpu_internal.cuh"

enum { GV_WARPS = 8, GV_THREADS = 32 * GV_WARPS, GV_RPW = 2, GV_UNROLL = 4, GV_MAX_CHUNKS_PER_LANE = 8 };

template <typename WT>
struct gv_chunk;
template <>
struct gv_chunk<__nv_bfloat16> {
    enum { N = 8 };
    static __device__ __forceinline__ void unpack(uint4 u, float *w)
    {
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 f = __bfloat1622float2(h[i]);
            w[2 * i] = f.x;
            w[2 * i + 1] = f.y;
        }
    }
};
template <>
struct gv_chunk<float> {
    enum { N = 4 };
    static __device__ __forceinline__ void unpack(uint4 u, float *w)
    {
        w[0] = __uint_as_float(u.x), w[1] = __uint_as_float(u.y);
        w[2] = __uint_as_float(u.z), w[3] = __uint_as_float(u.w);
    }
};

/* 16 bytes of weights, not kept in L1. */
static __device__ __forceinline__ uint4 gv_ld_weights(const void *p)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

/* n (4 or 8) floats of activations at p. */
template <int N>
static __device__ __forceinline__ void gv_ld_act(const float *p, float *a)
{
    float4 u = __ldg((const float4 *)p);
    a[0] = u.x, a[1] = u.y, a[2] = u.z, a[3] = u.w;
    if (N == 8) {
        float4 v = __ldg((const float4 *)(p + 4));
        a[4] = v.x, a[5] = v.y, a[6] = v.z, a[7] = v.w;
    }
}

/* acc[r][t] += W chunk of row r . a[t] chunk at column k */
template <typename WT, int TT, bool NORM>
static __device__ __forceinline__ void gv_fma(float (&acc)[GV_RPW][TT], const uint4 (&wv)[GV_RPW], const float *x,
                                              int64_t ldx, int nt, const float *nw, const float *rs, int64_t k)
{
    constexpr int CN = gv_chunk<WT>::N;
    float w[GV_RPW][CN], nv[CN];
#pragma unroll
    for (int r = 0; r < GV_RPW; r++)
        gv_chunk<WT>::unpack(wv[r], w[r]);
    if (NORM)
        gv_ld_act<CN>(nw + k, nv);
#pragma unroll
    for (int t = 0; t < TT; t++) {
        if (t < nt) {
            float a[CN];
            gv_ld_act<CN>(x + (int64_t)t * ldx + k, a);
            if (NORM) {
                const float r = rs[t];
#pragma unroll
                for (int i = 0; i < CN; i++)
                    a[i] = nv[i] * (a[i] * r);
            }
#pragma unroll
            for (int r = 0; r < GV_RPW; r++) {
                float s = acc[r][t];
#pragma unroll
                for (int i = 0; i < CN; i++)
                    s = fmaf(w[r][i], a[i], s);
                acc[r][t] = s;
            }
        }
    }
}

/* The block's rows [row0, row0 + (GV_WARPS / KS) * GV_RPW) for tokens
 * x[0..nt) (rows ldx floats apart). red: shared [GV_WARPS * GV_RPW * TT];
 * res: shared [GV_WARPS * GV_RPW * TT], on return res[r * TT + t] holds
 * row row0 + r, token t. Every thread of the block must call it. */
template <typename WT, int TT, bool NORM>
static __device__ __forceinline__ void gv_block(const WT *__restrict__ W, int64_t N, int64_t K, int64_t row0, int KS,
                                                const float *__restrict__ x, int64_t ldx, int nt,
                                                const float *__restrict__ nw, const float *rs, float *red,
                                                float *res)
{
    constexpr int CN = gv_chunk<WT>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = warp / KS, ks = warp % KS;
    const int64_t C = K / CN, step = 32 * (int64_t)KS;
    const WT *wr[GV_RPW];
#pragma unroll
    for (int r = 0; r < GV_RPW; r++) {
        int64_t n = row0 + (int64_t)g * GV_RPW + r;
        wr[r] = W + (n < N ? n : N - 1) * K;
    }
    float acc[GV_RPW][TT];
#pragma unroll
    for (int r = 0; r < GV_RPW; r++)
#pragma unroll
        for (int t = 0; t < TT; t++)
            acc[r][t] = 0.0f;
    int64_t c = (int64_t)ks * 32 + lane;
    for (; c + (GV_UNROLL - 1) * step < C; c += GV_UNROLL * step) {
        uint4 wv[GV_UNROLL][GV_RPW];
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++)
#pragma unroll
            for (int r = 0; r < GV_RPW; r++)
                wv[u][r] = gv_ld_weights(wr[r] + (c + u * step) * CN);
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++)
            gv_fma<WT, TT, NORM>(acc, wv[u], x, ldx, nt, nw, rs, (c + u * step) * CN);
    }
    for (; c < C; c += step) {
        uint4 wv[GV_RPW];
#pragma unroll
        for (int r = 0; r < GV_RPW; r++)
            wv[r] = gv_ld_weights(wr[r] + c * CN);
        gv_fma<WT, TT, NORM>(acc, wv, x, ldx, nt, nw, rs, c * CN);
    }
#pragma unroll
    for (int r = 0; r < GV_RPW; r++)
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float s = warp_sum(acc[r][t]);
            if (lane == 0)
                red[(warp * GV_RPW + r) * TT + t] = s;
        }
    __syncthreads();
    const int rows = (GV_WARPS / KS) * GV_RPW;
    for (int i = threadIdx.x; i < rows * TT; i += blockDim.x) {
        const int rr = i / TT, t = i % TT, gg = rr / GV_RPW, r = rr % GV_RPW;
        float s = 0.0f;
        for (int q = 0; q < KS; q++)
            s += red[((gg * KS + q) * GV_RPW + r) * TT + t];
        res[i] = s;
    }
    __syncthreads();
}

/* Warps per row group for N rows of K: each lane gets at most
 * GV_MAX_CHUNKS_PER_LANE chunks, and KS grows further while the grid would
 * have fewer than two blocks per multiprocessor and every lane keeps at
 * least one chunk. *blocks: blocks along the rows. */
static inline int gv_plan(int64_t N, int64_t K, int chunk, int n_tiles, int n_sm, int *blocks)
{
    const int64_t C = K / chunk;
    int KS = 1;
    while (KS < GV_WARPS && C > (int64_t)GV_MAX_CHUNKS_PER_LANE * 32 * KS)
        KS *= 2;
    int64_t b = (N + (GV_WARPS / KS) * GV_RPW - 1) / ((GV_WARPS / KS) * GV_RPW);
    while (KS < GV_WARPS && b * n_tiles < 2 * (int64_t)n_sm && C >= 32 * 2 * (int64_t)KS) {
        KS *= 2;
        b = (N + (GV_WARPS / KS) * GV_RPW - 1) / ((GV_WARPS / KS) * GV_RPW);
    }
    *blocks = (int)b;
    return KS;
}

#endif
