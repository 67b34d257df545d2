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
 * Quantised weights (gpu.h's INT8 / INT4 / FP8) take the same path: a
 * 16-byte chunk is 16 INT8 / FP8 or 32 INT4 weights, converted to fp32 in
 * registers (no dequantised copy anywhere), dotted with the activations, and
 * the chunk's sum of each (row, token) multiplied by its group's scale once;
 * the group (a multiple of 32) holds whole chunks. The bytes per weight are
 * what is saved: at 1-16 tokens the GEMV stays bound by them.
 * Requirements (checked by the callers): K a multiple of the chunk length;
 * W, x, nw 16-byte aligned; ldx a multiple of 4.
 */
#ifndef TD_CUDA_GPU_GEMV_CUH
#define TD_CUDA_GPU_GEMV_CUH

#include "cuda/gpu_internal.cuh"

#include <cuda_fp8.h>

enum { GV_WARPS = 8, GV_THREADS = 32 * GV_WARPS, GV_RPW = 2, GV_UNROLL = 4, GV_MAX_CHUNKS_PER_LANE = 8 };

/* Element types of the quantised formats (tags: the bytes are read as chunks). */
struct gv_i8 { signed char q; };
struct gv_i4 { unsigned char q2; };
struct gv_f8 { unsigned char q; };

/* Per-group scales of a quantised matrix (empty for BF16 / F32). */
struct gv_scales {
    const float *s;   /* [rows][ng] */
    int64_t ng;       /* groups per row */
    int group;        /* columns per scale */
};

/* gv_chunk<WT>: N weights per 16-byte chunk, unpack() to fp32, Q: scaled. */
template <typename WT>
struct gv_chunk;
template <>
struct gv_chunk<__nv_bfloat16> {
    enum { N = 8, Q = 0 };
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
    enum { N = 4, Q = 0 };
    static __device__ __forceinline__ void unpack(uint4 u, float *w)
    {
        w[0] = __uint_as_float(u.x), w[1] = __uint_as_float(u.y);
        w[2] = __uint_as_float(u.z), w[3] = __uint_as_float(u.w);
    }
};
template <>
struct gv_chunk<gv_i8> {
    enum { N = 16, Q = 1 };
    static __device__ __forceinline__ void unpack(uint4 u, float *w)
    {
        const uint32_t v[4] = { u.x, u.y, u.z, u.w };
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                w[4 * i + j] = (float)(signed char)(v[i] >> (8 * j));
    }
};
template <>
struct gv_chunk<gv_i4> {
    enum { N = 32, Q = 1 };
    /* nibble n (column 2j low, 2j + 1 high) -> n - 8: 0x4B000000 | n is the
     * float 2^23 + n, less 2^23 + 8 (one logic op and one add per weight) */
    static __device__ __forceinline__ void unpack(uint4 u, float *w)
    {
        const uint32_t v[4] = { u.x, u.y, u.z, u.w };
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 8; j++)
                w[8 * i + j] = __uint_as_float(0x4B000000u | ((v[i] >> (4 * j)) & 15u)) - 8388616.0f;
    }
};
template <>
struct gv_chunk<gv_f8> {
    enum { N = 16, Q = 1 };
    /* two E4M3 at a time to half2: one instruction from sm_89 on, integer
     * arithmetic below (cuda_fp8.h chooses per architecture) */
    static __device__ __forceinline__ void unpack(uint4 u, float *w)
    {
        const uint32_t v[4] = { u.x, u.y, u.z, u.w };
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v[i] >> (16 * j)), __NV_E4M3);
                const float2 f = __half22float2(*(const __half2 *)&h);
                w[4 * i + 2 * j] = f.x;
                w[4 * i + 2 * j + 1] = f.y;
            }
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

/* N (a multiple of 4) floats of activations at p. */
template <int N>
static __device__ __forceinline__ void gv_ld_act(const float *p, float *a)
{
#pragma unroll
    for (int i = 0; i < N / 4; i++) {
        float4 u = __ldg((const float4 *)(p + 4 * i));
        a[4 * i] = u.x, a[4 * i + 1] = u.y, a[4 * i + 2] = u.z, a[4 * i + 3] = u.w;
    }
}

/* acc[r][t] += W chunk of row r . a[t] chunk at column k (times sc[r], the
 * chunk's scale, for quantised weights) */
template <typename WT, int TT, bool NORM>
static __device__ __forceinline__ void gv_fma(float (&acc)[GV_RPW][TT], const uint4 (&wv)[GV_RPW], const float *x,
                                              int64_t ldx, int nt, const float *nw, const float *rs, int64_t k,
                                              const float (&sc)[GV_RPW])
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
                if constexpr (gv_chunk<WT>::Q) {
                    float s = 0.0f;
#pragma unroll
                    for (int i = 0; i < CN; i++)
                        s = fmaf(w[r][i], a[i], s);
                    acc[r][t] = fmaf(sc[r], s, acc[r][t]);
                } else {
                    float s = acc[r][t];
#pragma unroll
                    for (int i = 0; i < CN; i++)
                        s = fmaf(w[r][i], a[i], s);
                    acc[r][t] = s;
                }
            }
        }
    }
}

/* The scales of the chunk at column k of the rows whose scale rows are
 * srow[r] (1 for unquantised weights). */
template <typename WT>
static __device__ __forceinline__ void gv_scale(float (&sc)[GV_RPW], const gv_scales &qs,
                                                const float *const (&srow)[GV_RPW], int64_t k)
{
#pragma unroll
    for (int r = 0; r < GV_RPW; r++)
        sc[r] = gv_chunk<WT>::Q ? __ldg(srow[r] + k / qs.group) : 1.0f;
}

/* The block's rows [row0, row0 + (GV_WARPS / KS) * GV_RPW) for tokens
 * x[0..nt) (rows ldx floats apart). red: shared [GV_WARPS * GV_RPW * TT];
 * res: shared [GV_WARPS * GV_RPW * TT], on return res[r * TT + t] holds
 * row row0 + r, token t. qs: the scales of quantised WT. Every thread of
 * the block must call it. */
template <typename WT, int TT, bool NORM>
static __device__ __forceinline__ void gv_block(const WT *__restrict__ W, int64_t N, int64_t K, int64_t row0, int KS,
                                                const float *__restrict__ x, int64_t ldx, int nt,
                                                const float *__restrict__ nw, const float *rs, float *red,
                                                float *res, gv_scales qs = gv_scales{ nullptr, 0, 1 })
{
    constexpr int CN = gv_chunk<WT>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = warp / KS, ks = warp % KS;
    const int64_t C = K / CN, step = 32 * (int64_t)KS;
    const char *wr[GV_RPW];   /* rows as bytes: C chunks of 16 */
    const float *srow[GV_RPW];
#pragma unroll
    for (int r = 0; r < GV_RPW; r++) {
        int64_t n = row0 + (int64_t)g * GV_RPW + r;
        n = n < N ? n : N - 1;
        wr[r] = (const char *)W + n * C * 16;
        srow[r] = gv_chunk<WT>::Q ? qs.s + n * qs.ng : nullptr;
    }
    float acc[GV_RPW][TT];
#pragma unroll
    for (int r = 0; r < GV_RPW; r++)
#pragma unroll
        for (int t = 0; t < TT; t++)
            acc[r][t] = 0.0f;
    int64_t c = (int64_t)ks * 32 + lane;
    float sc[GV_RPW];
    for (; c + (GV_UNROLL - 1) * step < C; c += GV_UNROLL * step) {
        uint4 wv[GV_UNROLL][GV_RPW];
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++)
#pragma unroll
            for (int r = 0; r < GV_RPW; r++)
                wv[u][r] = gv_ld_weights(wr[r] + (c + u * step) * 16);
#pragma unroll
        for (int u = 0; u < GV_UNROLL; u++) {
            gv_scale<WT>(sc, qs, srow, (c + u * step) * CN);
            gv_fma<WT, TT, NORM>(acc, wv[u], x, ldx, nt, nw, rs, (c + u * step) * CN, sc);
        }
    }
    for (; c < C; c += step) {
        uint4 wv[GV_RPW];
#pragma unroll
        for (int r = 0; r < GV_RPW; r++)
            wv[r] = gv_ld_weights(wr[r] + c * 16);
        gv_scale<WT>(sc, qs, srow, c * CN);
        gv_fma<WT, TT, NORM>(acc, wv, x, ldx, nt, nw, rs, c * CN, sc);
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
