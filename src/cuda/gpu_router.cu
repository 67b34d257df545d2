/*
 * gpu_router.cu - top-k expert selection on the GPU, the rules of
 * src/cpu/router.c step for step (see there for the formulas):
 *   softmax (max subtracted, fp32 expf, sum in double), sigmoid + bias,
 *   group ranking (max, or the sum of the best two), then k rounds of
 *   "largest allowed choice, ties to the lower expert id", renormalisation
 *   (sigmoid: by sum + 1e-20) and the routed scaling factor.
 * Two kernels compute it:
 *   - one warp per token (E <= 1024, k <= 32, groups <= 32: every model we
 *     know): lane l holds the allowed bits of experts l, l + 32, ...; a round
 *     is a lane-local scan plus a 5-step shuffle reduction over (value, id)
 *     pairs, no block barriers;
 *   - one block per token (the first kernel, any size, and gpu_ctx_set_fast(0)):
 *     each round a block-wide argmax with two barriers.
 * Both pick the same experts with the same tie rule.
 *
 * Also here, because it shares the warp router: the hand-off lists of
 * gpu.h's gpu_handoff (immediate / deferred ids, pinned slot) and the fused
 * MoE gate (gpu_moe_gate): RMSNorm of x formed on the fly inside the router
 * GEMV (gpu_gemv.cuh, every block computes the same 1/RMS, block 0 also
 * stores h), and the last block to finish its rows (an atomic counter,
 * reset by that block) routes every token and writes the hand-off: one
 * launch instead of rmsnorm + router GEMV + route + pack.
 */
#include "cuda/gpu_gemv.cuh"

#include <string.h>

enum { RT_THREADS = 256 };

struct best {
    float v;
    int i;   /* -1 = none */
};

static __device__ __forceinline__ best better(best a, best b)
{
    if (b.i < 0)
        return a;
    if (a.i < 0 || b.v > a.v || (b.v == a.v && b.i < a.i))
        return b;
    return a;
}

/* Largest v[i] with allowed[i], ties to the lowest i; every thread gets it. */
static __device__ int block_argmax(const float *v, const unsigned char *allowed, int n, best *red)
{
    best b = { 0.0f, -1 };
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (allowed[i])
            b = better(b, best{ v[i], i });
    for (int o = 16; o > 0; o >>= 1) {
        best other;
        other.v = __shfl_xor_sync(0xffffffffu, b.v, o);
        other.i = __shfl_xor_sync(0xffffffffu, b.i, o);
        b = better(b, other);
    }
    const int w = threadIdx.x >> 5;
    __syncthreads(); /* red may still be read from the previous round */
    if ((threadIdx.x & 31) == 0)
        red[w] = b;
    __syncthreads();
    best r = red[0];
    for (int i = 1; i < (int)(blockDim.x >> 5); i++)
        r = better(r, red[i]);
    return r.i;
}

static __global__ void route_kernel(gpu_route_params r, const float *logits, int32_t *ids, float *wout)
{
    extern __shared__ float sm[];
    __shared__ best red[RT_THREADS / 32];
    __shared__ double dred[RT_THREADS / 32];
    __shared__ float fred[RT_THREADS / 32];
    const int E = r.n_expert, G = r.n_group > 0 ? r.n_group : 1, per = E / G, tid = threadIdx.x;
    float *score = sm, *choice = sm + E, *gs = sm + 2 * E;
    unsigned char *allowed = (unsigned char *)(gs + G), *gallow = allowed + E;
    const float *lg = logits + (int64_t)blockIdx.x * E;

    if (r.kind == GPU_ROUTE_SIGMOID_GROUP) {
        for (int e = tid; e < E; e += blockDim.x) {
            score[e] = 1.0f / (1.0f + expf(-lg[e]));
            choice[e] = score[e] + (r.bias ? r.bias[e] : 0.0f);
        }
    } else {
        float m = -INFINITY;
        for (int e = tid; e < E; e += blockDim.x)
            m = fmaxf(m, lg[e]);
        m = warp_max(m);
        if ((tid & 31) == 0)
            fred[tid >> 5] = m;
        __syncthreads();
        m = fred[0];
        for (int i = 1; i < (int)(blockDim.x >> 5); i++)
            m = fmaxf(m, fred[i]);
        double s = 0;
        for (int e = tid; e < E; e += blockDim.x) {
            score[e] = expf(lg[e] - m);
            s += score[e];
        }
        s = warp_sum_d(s);
        if ((tid & 31) == 0)
            dred[tid >> 5] = s;
        __syncthreads();
        s = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++)
            s += dred[i];
        for (int e = tid; e < E; e += blockDim.x) {
            score[e] = (float)(score[e] / s);
            choice[e] = score[e];
        }
    }
    for (int e = tid; e < E; e += blockDim.x)
        allowed[e] = 1;
    __syncthreads();
    if (r.kind != GPU_ROUTE_SOFTMAX && G > 1 && r.topk_group < G) {
        for (int g = tid; g < G; g += blockDim.x) {
            const float *c = choice + g * per;
            if (r.kind == GPU_ROUTE_SIGMOID_GROUP) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int i = 0; i < per; i++) {
                    if (c[i] > b1) {
                        b2 = b1;
                        b1 = c[i];
                    } else if (c[i] > b2) {
                        b2 = c[i];
                    }
                }
                gs[g] = per > 1 ? b1 + b2 : b1;
            } else {
                float b = -INFINITY;
                for (int i = 0; i < per; i++)
                    b = c[i] > b ? c[i] : b;
                gs[g] = b;
            }
            gallow[g] = 1;
        }
        __syncthreads();
        if (tid == 0) {
            /* few groups: one thread ranks them, in the CPU's order */
            for (int k = 0; k < r.topk_group; k++) {
                int best_g = -1;
                for (int g = 0; g < G; g++)
                    if (gallow[g] && (best_g < 0 || gs[g] > gs[best_g]))
                        best_g = g;
                gallow[best_g] = 0;
            }
        }
        __syncthreads();
        /* gallow is now 0 exactly for the kept groups */
        for (int e = tid; e < E; e += blockDim.x)
            allowed[e] = gallow[e / per] == 0;
        __syncthreads();
    }
    int32_t *id = ids + (int64_t)blockIdx.x * r.k;
    float *w = wout + (int64_t)blockIdx.x * r.k;
    for (int k = 0; k < r.k; k++) {
        int e = block_argmax(choice, allowed, E, red);
        if (tid == 0) {
            id[k] = e;
            w[k] = score[e];
            allowed[e] = 0;
        }
        __syncthreads();
    }
    if (tid == 0) {
        double sum = 0;
        for (int k = 0; k < r.k; k++)
            sum += w[k];
        if (r.norm) {
            double den = r.kind == GPU_ROUTE_SIGMOID_GROUP ? sum + 1e-20 : sum;
            for (int k = 0; k < r.k; k++)
                w[k] = (float)(w[k] / den);
        }
        for (int k = 0; k < r.k; k++)
            w[k] *= r.scale;
    }
}

/* ---- one warp per token ------------------------------------------------------------- */
static __device__ __forceinline__ best warp_best(best b)
{
    for (int o = 16; o > 0; o >>= 1) {
        best other;
        other.v = __shfl_xor_sync(0xffffffffu, b.v, o);
        other.i = __shfl_xor_sync(0xffffffffu, b.i, o);
        b = better(b, other);
    }
    return b;
}

/* The warp routes one token: lane k < K gets its k-th choice (id, weight).
 * score, choice: the warp's shared scratch of E floats each. CG: the logits
 * were written by other blocks of this launch (read through L2). */
template <bool CG>
static __device__ void route_warp(const gpu_route_params &r, const float *lg, float *score, float *choice, int *id_out,
                                  float *w_out)
{
    const int lane = threadIdx.x & 31, E = r.n_expert, K = r.k;
    const int G = r.n_group > 0 ? r.n_group : 1, per = E / G, nper = (E + 31) / 32;
    if (r.kind == GPU_ROUTE_SIGMOID_GROUP) {
        for (int e = lane; e < E; e += 32) {
            const float v = CG ? __ldcg(lg + e) : lg[e];
            score[e] = 1.0f / (1.0f + expf(-v));
            choice[e] = score[e] + (r.bias ? r.bias[e] : 0.0f);
        }
    } else {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32)
            m = fmaxf(m, CG ? __ldcg(lg + e) : lg[e]);
        m = warp_max(m);
        double s = 0;
        for (int e = lane; e < E; e += 32) {
            score[e] = expf((CG ? __ldcg(lg + e) : lg[e]) - m);
            s += score[e];
        }
        s = warp_sum_d(s);
        for (int e = lane; e < E; e += 32) {
            score[e] = (float)(score[e] / s);
            choice[e] = score[e];
        }
    }
    __syncwarp();
    unsigned allow = 0; /* bit i: expert lane + 32 i may still be chosen */
    for (int i = 0; i < nper; i++)
        if (lane + 32 * i < E)
            allow |= 1u << i;
    if (r.kind != GPU_ROUTE_SOFTMAX && G > 1 && r.topk_group < G) {
        float gsv = -INFINITY; /* lane g scores group g, as the CPU does */
        if (lane < G) {
            const float *c = choice + lane * per;
            if (r.kind == GPU_ROUTE_SIGMOID_GROUP) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int i = 0; i < per; i++) {
                    if (c[i] > b1) {
                        b2 = b1;
                        b1 = c[i];
                    } else if (c[i] > b2) {
                        b2 = c[i];
                    }
                }
                gsv = per > 1 ? b1 + b2 : b1;
            } else {
                for (int i = 0; i < per; i++)
                    gsv = c[i] > gsv ? c[i] : gsv;
            }
        }
        int gallow = lane < G;
        unsigned keep = 0;
        for (int k = 0; k < r.topk_group; k++) {
            best b = warp_best(gallow ? best{ gsv, lane } : best{ 0.0f, -1 });
            if (b.i >= 0) {
                keep |= 1u << b.i;
                if (lane == b.i)
                    gallow = 0;
            }
        }
        for (int i = 0; i < nper; i++) {
            const int e = lane + 32 * i;
            if (e < E && !((keep >> (e / per)) & 1u))
                allow &= ~(1u << i);
        }
    }
    double sum = 0;
    int my_id = -1;
    float my_w = 0.0f;
    for (int k = 0; k < K; k++) {
        best b = { 0.0f, -1 };
        for (int i = 0; i < nper; i++)
            if ((allow >> i) & 1u) {
                const int e = lane + 32 * i;
                if (b.i < 0 || choice[e] > b.v)
                    b = best{ choice[e], e };
            }
        b = warp_best(b);
        const float we = b.i >= 0 ? score[b.i] : 0.0f;
        if (b.i >= 0 && lane == (b.i & 31))
            allow &= ~(1u << (b.i >> 5));
        if (lane == k) {
            my_id = b.i;
            my_w = we;
        }
        sum += we;
    }
    if (r.norm) {
        const double den = r.kind == GPU_ROUTE_SIGMOID_GROUP ? sum + 1e-20 : sum;
        my_w = (float)(my_w / den);
    }
    *id_out = my_id;
    *w_out = my_w * r.scale;
}

/* Lane k < K holds choice k (id, w) of token t; the warp writes the hand-off
 * lists of gpu_handoff (every lane must call: the ranks use shuffles). */
static __device__ void slot_write(const gpu_handoff &ho, int t, int K, int id, float w)
{
    const int lane = threadIdx.x & 31;
    int rank = 0; /* choices that beat this one: larger weight, or equal and earlier */
    for (int j = 0; j < K; j++) {
        const float wj = __shfl_sync(0xffffffffu, w, j);
        rank += wj > w || (wj == w && j < lane);
    }
    if (lane >= K)
        return;
    const int def = rank >= K - ho.defer, on_gpu = ho.slot && id >= 0 && ho.slot[id] >= 0;
    const int64_t i = (int64_t)t * K + lane;
    if (ho.host_ids)
        ho.host_ids[i] = def || on_gpu ? -1 : id;
    if (ho.host_ids_def)
        ho.host_ids_def[i] = def && !on_gpu ? id : -1;
    if (ho.host_w)
        ho.host_w[i] = w;
    if (ho.gpu_ids)
        ho.gpu_ids[i] = def ? -1 : id;
    if (ho.gpu_ids_def)
        ho.gpu_ids_def[i] = def ? id : -1;
}

enum { RW_WARPS = 4 };

/* grid ceil(T / RW_WARPS), 32 * RW_WARPS threads; smem RW_WARPS * 2E floats. */
static __global__ void route_warp_kernel(gpu_route_params r, int T, const float *logits, int32_t *ids, float *w)
{
    extern __shared__ float4 rw_sm4[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.x * RW_WARPS + warp;
    if (t >= T)
        return; /* the whole warp: nothing below synchronises the block */
    float *score = (float *)rw_sm4 + (int64_t)warp * 2 * r.n_expert, *choice = score + r.n_expert;
    int id;
    float wt;
    route_warp<false>(r, logits + (int64_t)t * r.n_expert, score, choice, &id, &wt);
    if (lane < r.k) {
        ids[(int64_t)t * r.k + lane] = id;
        w[(int64_t)t * r.k + lane] = wt;
    }
}

static int route_fits_warp(const gpu_route_params *r)
{
    const int G = r->n_group > 0 ? r->n_group : 1;
    return r->n_expert <= 1024 && r->k <= 32 && G <= 32;
}

extern "C" int gpu_route(gpu_ctx *c, const gpu_route_params *r, int T, const float *logits, int32_t *ids, float *w)
{
    if (c->rc || T <= 0)
        return c->rc;
    int G = r->n_group > 0 ? r->n_group : 1;
    if (r->n_expert < 1 || r->n_expert % G != 0 || r->k < 1 || r->k > r->n_expert || r->topk_group > G)
        return gpu_fail(c, "route", "inconsistent routing parameters");
    if (c->fast && route_fits_warp(r)) {
        size_t smem = (size_t)RW_WARPS * 2 * r->n_expert * sizeof(float);
        route_warp_kernel<<<gpu_cdiv(T, RW_WARPS), 32 * RW_WARPS, smem, c->s[GPU_MAIN]>>>(*r, T, logits, ids, w);
        return gpu_launched(c, "route (one warp per token)");
    }
    size_t smem = (size_t)(2 * r->n_expert + G) * sizeof(float) + (size_t)(r->n_expert + G);
    if (smem > 48 * 1024)
        return gpu_fail(c, "route", "more than 5000 experts are not supported");
    route_kernel<<<T, RT_THREADS, smem, c->s[GPU_MAIN]>>>(*r, logits, ids, w);
    return gpu_launched(c, "route");
}

/* ---- the hand-off lists, standalone ------------------------------------------------------ */
static __global__ void pack_kernel(gpu_handoff ho, const float *h, int T, int D, int K, const int32_t *ids,
                                   const float *w)
{
    const int64_t n = (int64_t)T * D, tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    if (ho.host_x)
        for (int64_t i = tid; i < n; i += stride) {
            if (ho.x_bf16)
                ((__nv_bfloat16 *)ho.host_x)[i] = __float2bfloat16_rn(h[i]);
            else
                ((float *)ho.host_x)[i] = h[i];
        }
    const int lane = threadIdx.x & 31;
    for (int64_t t = tid >> 5; t < T; t += stride >> 5) { /* the same for the whole warp */
        int id = -1;
        float wt = 0.0f;
        if (lane < K) {
            id = ids[t * K + lane];
            wt = w[t * K + lane];
        }
        slot_write(ho, (int)t, K, id, wt);
    }
}

extern "C" int gpu_handoff_pack(gpu_ctx *c, const gpu_handoff *ho, const float *h, int T, int D, int K,
                                const int32_t *ids, const float *w)
{
    if (c->rc || T <= 0)
        return c->rc;
    if (K > 32)
        return gpu_fail(c, "hand-off pack", "more than 32 experts per token are not supported yet");
    int64_t work = (int64_t)T * D > (int64_t)T * 32 ? (int64_t)T * D : (int64_t)T * 32;
    int blocks = gpu_cdiv(work, 256) < 1024 ? gpu_cdiv(work, 256) : 1024;
    pack_kernel<<<blocks > 0 ? blocks : 1, 256, 0, c->s[GPU_MAIN]>>>(*ho, h, T, D, K, ids, w);
    return gpu_launched(c, "hand-off pack");
}

/* ---- the fused MoE gate -------------------------------------------------------------------- */
typedef struct {
    const float *x, *nw;
    float eps;
    float *h;
    int T, D;
    const void *W;
    int E, KS;
    gpu_route_params r;
    float *logits;
    int32_t *ids;
    float *w;
    gpu_handoff ho;
    int has_ho;
    int *cnt;
} gate_args;

/* grid (router row blocks, token tiles of TT), GV_THREADS threads; dynamic
 * smem GV_WARPS * 2E floats for the routing of the last block. */
template <typename WT, int TT>
static __global__ void __launch_bounds__(GV_THREADS, 2) gate_kernel(gate_args a)
{
    __shared__ float red[GV_WARPS * GV_RPW * TT], res[GV_WARPS * GV_RPW * TT], rs[TT];
    __shared__ double rpart[GV_WARPS][TT];
    __shared__ int is_last;
    extern __shared__ float4 gate_sm4[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, D = a.D, E = a.E, K = a.r.k;
    const int t0 = blockIdx.y * TT, nt = a.T - t0 < TT ? a.T - t0 : TT;
    const float *x = a.x + (int64_t)t0 * D;
    /* 1/RMS of the tile's tokens with the whole block (every block computes the
     * same values in the same order); 16-byte loads, D % 8 == 0 */
    {
        double ss[TT];
#pragma unroll
        for (int t = 0; t < TT; t++)
            ss[t] = 0;
        for (int i = threadIdx.x; i < D / 4; i += blockDim.x)
#pragma unroll
            for (int t = 0; t < TT; t++)
                if (t < nt) {
                    const float4 u = __ldg((const float4 *)(x + (int64_t)t * D) + i);
                    ss[t] += (double)u.x * u.x + (double)u.y * u.y + (double)u.z * u.z + (double)u.w * u.w;
                }
#pragma unroll
        for (int t = 0; t < TT; t++) {
            const double v = warp_sum_d(ss[t]);
            if (lane == 0)
                rpart[warp][t] = v;
        }
        __syncthreads();
        if ((int)threadIdx.x < nt) {
            double v = 0;
            for (int w = 0; w < GV_WARPS; w++)
                v += rpart[w][threadIdx.x];
            rs[threadIdx.x] = gpu_rms_inv(v, D, a.eps);
        }
        __syncthreads();
    }
    const int rows = (GV_WARPS / a.KS) * GV_RPW;
    const int64_t row0 = (int64_t)blockIdx.x * rows;
    gv_block<WT, TT, true>((const WT *)a.W, E, D, row0, a.KS, x, D, nt, a.nw, rs, red, res);
    for (int i = threadIdx.x; i < rows * TT; i += blockDim.x) {
        const int64_t n = row0 + i / TT;
        const int t = i % TT;
        if (n < E && t < nt)
            a.logits[(int64_t)(t0 + t) * E + n] = res[i];
    }
    if (blockIdx.x == 0) /* h of the tile: for the shared experts, the GPU experts and the CPU */
        for (int64_t i = threadIdx.x; i < (int64_t)nt * D; i += blockDim.x) {
            const int t = (int)(i / D), k = (int)(i % D);
            const float v = a.nw[k] * (x[i] * rs[t]);
            a.h[(int64_t)t0 * D + i] = v;
            if (a.has_ho && a.ho.host_x) {
                if (a.ho.x_bf16)
                    ((__nv_bfloat16 *)a.ho.host_x)[(int64_t)t0 * D + i] = __float2bfloat16_rn(v);
                else
                    ((float *)a.ho.host_x)[(int64_t)t0 * D + i] = v;
            }
        }
    /* the last block to finish routes every token */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        is_last = atomicAdd(a.cnt, 1) == (int)(gridDim.x * gridDim.y) - 1;
    __syncthreads();
    if (!is_last)
        return;
    float *score = (float *)gate_sm4 + (int64_t)warp * 2 * E, *choice = score + E;
    for (int t = warp; t < a.T; t += GV_WARPS) {
        int id;
        float wt;
        route_warp<true>(a.r, a.logits + (int64_t)t * E, score, choice, &id, &wt);
        if (lane < K) {
            a.ids[(int64_t)t * K + lane] = id;
            a.w[(int64_t)t * K + lane] = wt;
        }
        if (a.has_ho)
            slot_write(a.ho, t, K, id, wt);
        __syncwarp(); /* score and choice are reused for the warp's next token */
    }
    if (threadIdx.x == 0)
        *a.cnt = 0; /* for the next launch (or graph replay) */
}

template <typename WT, int TT>
static void gate_launch(gpu_ctx *c, gate_args *a)
{
    int bx;
    const int tiles = gpu_cdiv(a->T, TT);
    a->KS = gv_plan(a->E, a->D, gv_chunk<WT>::N, tiles, c->n_sm, &bx);
    size_t smem = (size_t)GV_WARPS * 2 * a->E * sizeof(float);
    gate_kernel<WT, TT><<<dim3(bx, tiles), GV_THREADS, smem, c->s[GPU_MAIN]>>>(*a);
}

template <typename WT>
static void gate_dispatch(gpu_ctx *c, gate_args *a)
{
    if (a->T <= 1)
        gate_launch<WT, 1>(c, a);
    else if (a->T <= 2)
        gate_launch<WT, 2>(c, a);
    else if (a->T <= 4)
        gate_launch<WT, 4>(c, a);
    else
        gate_launch<WT, 8>(c, a);
}

extern "C" int gpu_moe_gate(gpu_ctx *c, int T, int D, const float *x, const float *norm_w, float eps, float *h,
                            const gpu_mat *router, const gpu_route_params *r, float *logits, int32_t *ids, float *w,
                            const gpu_handoff *ho)
{
    if (c->rc || T <= 0)
        return c->rc;
    const int E = r->n_expert, G = r->n_group > 0 ? r->n_group : 1;
    const int fuse = c->fast && T <= 16 && E <= 512 && route_fits_warp(r) && E % G == 0 && r->k <= E &&
                     r->topk_group <= G && router->rows == E && router->cols == D && D % 8 == 0 && norm_w &&
                     gpu_aligned16(x) && gpu_aligned16(norm_w) && gpu_aligned16(router->data);
    if (!fuse) {
        gpu_rmsnorm(c, h, x, T, D, 1, 0, norm_w, D, eps);
        gpu_matmul_exact(c, logits, E, h, D, T, router, NULL, 0);
        gpu_route(c, r, T, logits, ids, w);
        if (ho)
            gpu_handoff_pack(c, ho, h, T, D, r->k, ids, w);
        return c->rc;
    }
    gate_args a;
    memset(&a, 0, sizeof a);
    a.x = x, a.nw = norm_w, a.eps = eps, a.h = h, a.T = T, a.D = D;
    a.W = router->data, a.E = E, a.r = *r, a.logits = logits, a.ids = ids, a.w = w;
    if (ho)
        a.ho = *ho, a.has_ho = 1;
    a.cnt = c->counters + GPU_CNT_GATE;
    if (router->dt == GPU_BF16)
        gate_dispatch<__nv_bfloat16>(c, &a);
    else
        gate_dispatch<float>(c, &a);
    return gpu_launched(c, "MoE gate (fused norm, router, route, hand-off)");
}
