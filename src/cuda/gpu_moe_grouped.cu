/*
 * gpu_moe_grouped.cu - the GPU's routed experts for long passes (prefill,
 * streamed layers): the (token, k) pairs grouped by expert into GEMMs on
 * tensor cores, instead of one GEMV per pair (gpu_moe.cu), which reads an
 * expert's weights once per pair: 75 ms for one Qwen3-30B-A3B layer at 4096
 * tokens on the H200 (`bench e2e --pcie`), more than the PCIe copy of the
 * layer it was meant to hide behind.
 *
 * For BF16 experts, passes of more than exact_max_T tokens (the decode sizes
 * keep the GEMV and its fp32 activations), d_model and d_ff multiples of
 * GX_BN, 16-byte aligned weights:
 *   (1) count     pairs per expert (GPU-held, listed experts only)
 *   (2) plan      one thread: each expert's rows start at a multiple of GX_BM
 *                 (off[]), and every row tile names its expert (tile_e[])
 *   (3) place     pair i -> a row of its expert (rowof[i]; row order within an
 *                 expert does not change any row's result)
 *   (4) gather    A[row] = bf16(h[token of the row]), zero for padding rows
 *   (5) gate/up   act[row][j] = bf16(silu(A.Wg[j]) * (A.Wu[j])), one GEMM with
 *                 two accumulators, so gate and up never leave the SM in fp32
 *   (6) down      out[row] = act[row] . Wd^T (fp32)
 *   (7) combine   x[t] += sum_k w[t][k] out[rowof[t*K+k]], in k order
 * Activations are rounded to BF16 as for the dense cuBLAS path of prefill;
 * sums are fp32. Every step is a kernel with device-side sizes: no sync, and
 * a graph may capture it. The GEMM is WMMA 16x16x16 BF16, a GX_BM x GX_BN
 * block tile of 4 warps (32 x 32 each), K in steps of GX_BK through shared
 * memory.
 */
#include <mma.h>

#include "cuda/gpu_internal.cuh"

using namespace nvcuda;

enum { GX_BM = 64, GX_BN = 64, GX_BK = 32, GX_LDS = GX_BK + 8, GX_LDC = GX_BN + 4, GX_THREADS = 128 };

/* where each part of the scratch lies, for R padded rows */
struct gx_layout {
    float *out;           /* [R][D] */
    __nv_bfloat16 *a;     /* [R][D] */
    __nv_bfloat16 *act;   /* [R][F] */
    int32_t *cnt, *off, *fill, *tile_e, *rowof, *rowpair;
    int64_t R;
};

/* the padded rows gpu_moe_scratch_floats (gpu.h) counts */
static_assert(GX_BM == GPU_MOE_ROW_TILE, "gpu.h sizes the grouped scratch for this tile");
static int64_t gx_rows(int64_t TK, int64_t E) { return (TK + E * (GX_BM - 1) + GX_BM - 1) / GX_BM * GX_BM; }

static gx_layout gx_carve(float *scratch, int64_t TK, int64_t E, int64_t D, int64_t F)
{
    gx_layout g;
    g.R = gx_rows(TK, E);
    char *p = (char *)scratch;
    g.out = (float *)p;
    p += g.R * D * 4;
    g.a = (__nv_bfloat16 *)p;
    p += g.R * D * 2;
    g.act = (__nv_bfloat16 *)p;
    p += g.R * F * 2;
    g.cnt = (int32_t *)p;
    g.fill = g.cnt + E;
    g.off = g.fill + E;   /* [E + 1] */
    g.tile_e = g.off + E + 1;
    g.rowof = g.tile_e + g.R / GX_BM;
    g.rowpair = g.rowof + TK;
    return g;
}

static __global__ void gx_count_kernel(int32_t *cnt, const int32_t *ids, const int32_t *slot, int TK)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < TK) {
        int e = ids[i];
        if (e >= 0 && slot[e] >= 0)
            atomicAdd(&cnt[e], 1);
    }
}

static __global__ void gx_plan_kernel(int32_t *off, int32_t *fill, int32_t *tile_e, const int32_t *cnt, int E,
                                      int n_tiles)
{
    int rows = 0, tile = 0;
    for (int e = 0; e < E; e++) {
        off[e] = rows;
        fill[e] = 0;
        int nt = (cnt[e] + GX_BM - 1) / GX_BM;
        for (int j = 0; j < nt; j++)
            tile_e[tile++] = e;
        rows += nt * GX_BM;
    }
    off[E] = rows;
    for (; tile < n_tiles; tile++)
        tile_e[tile] = -1;
}

static __global__ void gx_place_kernel(int32_t *rowof, int32_t *rowpair, int32_t *fill, const int32_t *off,
                                       const int32_t *ids, const int32_t *slot, int TK)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= TK)
        return;
    int e = ids[i];
    if (e < 0 || slot[e] < 0) {
        rowof[i] = -1;
        return;
    }
    int r = off[e] + atomicAdd(&fill[e], 1);
    rowof[i] = r;
    rowpair[r] = i;
}

/* grid (R), block 128: row r of A from its pair's token (or zeros) */
static __global__ void gx_gather_kernel(__nv_bfloat16 *a, const float *h, int64_t ldh, const int32_t *rowpair,
                                        const int32_t *off, int E, int K, int D)
{
    const int r = blockIdx.x;
    __nv_bfloat16 *dst = a + (int64_t)r * D;
    const int p = r < off[E] ? rowpair[r] : -1;
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        dst[j] = __float2bfloat16(p >= 0 ? h[(int64_t)(p / K) * ldh + j] : 0.0f);
}

/* One GX_BM x GX_BN tile of rows (one expert, tile_e[blockIdx.y]) times the
 * rows n0.. of that expert's matrix: W[place] is [Nw][Kd], row-major.
 * GLU: two accumulators, columns n0.. (gate) and F + n0.. (up), written as
 * act = bf16(silu(g) * u) to c16 [R][F]; otherwise fp32 to c32 [R][ldc]. */
template <int GLU>
static __global__ void __launch_bounds__(GX_THREADS)
    gx_gemm_kernel(const __nv_bfloat16 *A, int64_t lda, const __nv_bfloat16 *W, int64_t Nw, int64_t Kd,
                   const int32_t *tile_e, const int32_t *slot, float *c32, __nv_bfloat16 *c16, int64_t ldc, int F)
{
    const int e = tile_e[blockIdx.y];
    if (e < 0)
        return;
    const int64_t row0 = (int64_t)blockIdx.y * GX_BM, n0 = (int64_t)blockIdx.x * GX_BN;
    const __nv_bfloat16 *Wp = W + (int64_t)slot[e] * Nw * Kd;
    /* the K loop's tiles, then (reused) the epilogue's fp32 staging */
    constexpr int LOOP_BYTES = (2 + GLU) * GX_BM * GX_LDS * 2, EPI_BYTES = (1 + GLU) * GX_BM * GX_LDC * 4;
    __shared__ __align__(32) unsigned char smem[LOOP_BYTES > EPI_BYTES ? LOOP_BYTES : EPI_BYTES];
    __nv_bfloat16 *As = (__nv_bfloat16 *)smem, *Bs = As + GX_BM * GX_LDS, *Us = Bs + GX_BN * GX_LDS;
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], accu[2][2]; /* accu: GLU only */
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            wmma::fill_fragment(acc[i][j], 0.0f);
            if (GLU)
                wmma::fill_fragment(accu[i][j], 0.0f);
        }
    for (int64_t k0 = 0; k0 < Kd; k0 += GX_BK) {
        /* 64 rows x 32 bf16 per tile: 256 pieces of 16 bytes, 2 per thread */
        for (int c = tid; c < GX_BM * GX_BK / 8; c += GX_THREADS) {
            const int r = c >> 2, q = (c & 3) * 8;
            *(uint4 *)(As + r * GX_LDS + q) = *(const uint4 *)(A + (row0 + r) * lda + k0 + q);
            *(uint4 *)(Bs + r * GX_LDS + q) = *(const uint4 *)(Wp + (n0 + r) * Kd + k0 + q);
            if (GLU)
                *(uint4 *)(Us + r * GX_LDS + q) = *(const uint4 *)(Wp + (F + n0 + r) * Kd + k0 + q);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GX_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
            for (int i = 0; i < 2; i++)
                wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * GX_LDS + kk, GX_LDS);
            for (int j = 0; j < 2; j++) {
                /* B[k][n] = W[n][k]: the weight tile read column-major */
                wmma::load_matrix_sync(fb, Bs + (wn * 32 + j * 16) * GX_LDS + kk, GX_LDS);
                for (int i = 0; i < 2; i++)
                    wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
                if (GLU) {
                    wmma::load_matrix_sync(fb, Us + (wn * 32 + j * 16) * GX_LDS + kk, GX_LDS);
                    for (int i = 0; i < 2; i++)
                        wmma::mma_sync(accu[i][j], fa[i], fb, accu[i][j]);
                }
            }
        }
        __syncthreads();
    }
    float *Cs = (float *)smem, *Cu = Cs + GX_BM * GX_LDC;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            float *at = Cs + (wm * 32 + i * 16) * GX_LDC + wn * 32 + j * 16;
            wmma::store_matrix_sync(at, acc[i][j], GX_LDC, wmma::mem_row_major);
            if (GLU)
                wmma::store_matrix_sync(Cu + (at - Cs), accu[i][j], GX_LDC, wmma::mem_row_major);
        }
    __syncthreads();
    for (int c = tid; c < GX_BM * GX_BN; c += GX_THREADS) {
        const int r = c / GX_BN, n = c % GX_BN;
        const float g = Cs[r * GX_LDC + n];
        if (GLU) {
            const float u = Cu[r * GX_LDC + n];
            c16[(row0 + r) * ldc + n0 + n] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
        } else {
            c32[(row0 + r) * ldc + n0 + n] = g;
        }
    }
}

/* grid (ceil(D / 256), T): x[t] += sum_k w[t][k] out[rowof[t*K+k]], k in order */
static __global__ void gx_combine_kernel(float *x, int64_t ldx, const float *out, int D, int K, const int32_t *rowof,
                                         const float *w)
{
    const int t = blockIdx.y, d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D)
        return;
    float acc = 0;
    int any = 0;
    for (int k = 0; k < K; k++) {
        const int r = rowof[t * K + k];
        if (r >= 0) {
            acc += w[t * K + k] * out[(int64_t)r * D + d];
            any = 1;
        }
    }
    if (any)
        x[(int64_t)t * ldx + d] += acc;
}

int gpu_moe_grouped_fits(const gpu_ctx *c, const gpu_experts *ex, int T, const float *h, int64_t ldh)
{
    return T > c->exact_max_T && ex->dt == GPU_BF16 && ex->d_model % GX_BN == 0 && ex->d_ff % GX_BN == 0 &&
           ldh % 4 == 0 && gpu_aligned16(h) && gpu_aligned16(ex->gate_up) && gpu_aligned16(ex->down);
}

int gpu_moe_grouped(gpu_ctx *c, const gpu_experts *ex, int T, int K, const float *h, int64_t ldh,
                               const int32_t *ids, const float *w, float *x, int64_t ldx, float *scratch)
{
    const int TK = T * K, E = ex->n_expert, D = ex->d_model, F = ex->d_ff;
    const gx_layout g = gx_carve(scratch, TK, E, D, F);
    const int n_tiles = (int)(g.R / GX_BM);
    if (n_tiles > 65535)
        return gpu_fail(c, "GPU experts (grouped)", "more than 65535 row tiles in one call");
    cudaStream_t s = c->s[GPU_MAIN];
    if (gpu_check(c, cudaMemsetAsync(g.cnt, 0, (size_t)E * 4, s), "GPU experts (grouped): zero counts") ||
        gpu_check(c, cudaMemsetAsync(g.rowpair, 0xff, (size_t)g.R * 4, s), "GPU experts (grouped): reset rows"))
        return c->rc;
    gx_count_kernel<<<gpu_cdiv(TK, 256), 256, 0, s>>>(g.cnt, ids, ex->slot, TK);
    gx_plan_kernel<<<1, 1, 0, s>>>(g.off, g.fill, g.tile_e, g.cnt, E, n_tiles);
    gx_place_kernel<<<gpu_cdiv(TK, 256), 256, 0, s>>>(g.rowof, g.rowpair, g.fill, g.off, ids, ex->slot, TK);
    gx_gather_kernel<<<(unsigned)g.R, 128, 0, s>>>(g.a, h, ldh, g.rowpair, g.off, E, K, D);
    if (gpu_launched(c, "GPU experts (grouped): routing"))
        return c->rc;
    gx_gemm_kernel<1><<<dim3(F / GX_BN, n_tiles), GX_THREADS, 0, s>>>(
        g.a, D, (const __nv_bfloat16 *)ex->gate_up, 2 * (int64_t)F, D, g.tile_e, ex->slot, NULL, g.act, F, F);
    gx_gemm_kernel<0><<<dim3(D / GX_BN, n_tiles), GX_THREADS, 0, s>>>(
        g.act, F, (const __nv_bfloat16 *)ex->down, D, F, g.tile_e, ex->slot, g.out, NULL, D, F);
    if (gpu_launched(c, "GPU experts (grouped): GEMMs"))
        return c->rc;
    gx_combine_kernel<<<dim3(gpu_cdiv(D, 256), T), 256, 0, s>>>(x, ldx, g.out, D, K, g.rowof, w);
    return gpu_launched(c, "GPU experts (grouped): combine");
}
