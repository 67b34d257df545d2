/*
 * gpu_moe.cu - routed experts that live on the GPU ("hot" experts of the
 * placement plan), and the CPU's result of a hand-off added from pinned
 * memory (the slot itself is written in gpu_router.cu, beside the router).
 *
 * Work is one (token, k) slot per grid row: slot i = t*K + k names expert
 * ids[i]; if that id is -1 (not in this list: deferred, or immediate when
 * the deferred ones run) or the expert has no GPU place, the whole row of
 * blocks returns.
 *   (1) gu[i] = W_gate_up[place] . h[t]        one warp per output row
 *   (2) act[i] = silu(gate) * up
 *   (3) out[i] = W_down[place] . act[i]         one warp per output row
 *   (4) x[t] += sum_k w[t][k] * out[t*K+k]     in k order, deterministic
 * This is a GEMV per slot: right for decode (a few tokens, each weight row
 * read once per slot from HBM or L2), wasteful for long passes, which
 * gpu_moe_grouped.cu takes (BF16 experts, T above the decode sizes). fp32
 * activations and sums; weights BF16 or F32 as stored.
 */
#include "cuda/gpu_internal.cuh"

enum { EX_WARPS = 8 };

/* grid (ceil(N / EX_WARPS), T*K): y[i][n] = W[place(i)][n] . x[row(i)], row(i) = i / xdiv. */
template <typename WT>
static __global__ void ex_gemv_kernel(float *y, int64_t ldy, const float *x, int64_t ldx, int xdiv, const WT *W,
                                      int64_t N, int64_t Kd, const int32_t *ids, const int32_t *slot, int vec)
{
    const int i = blockIdx.y;
    const int e = ids[i], place = e >= 0 ? slot[e] : -1;
    if (place < 0)
        return;
    const int lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * EX_WARPS + (threadIdx.x >> 5);
    if (n >= N)
        return;
    const WT *w = W + ((int64_t)place * N + n) * Kd;
    const float *xr = x + (int64_t)(i / xdiv) * ldx;
    float acc = 0;
    if (vec) {
        for (int64_t k = (int64_t)lane * 8; k < Kd; k += 256) {
            float wv[8];
            gpu_load8(w + k, wv);
            float4 a = *(const float4 *)(xr + k), b = *(const float4 *)(xr + k + 4);
            acc += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * b.x + wv[5] * b.y + wv[6] * b.z +
                   wv[7] * b.w;
        }
    } else {
        for (int64_t k = lane; k < Kd; k += 32)
            acc += gpu_ld(w, k) * xr[k];
    }
    acc = warp_sum(acc);
    if (lane == 0)
        y[(int64_t)i * ldy + n] = acc;
}

static __global__ void ex_act_kernel(float *act, const float *gu, int F, const int32_t *ids, const int32_t *slot)
{
    const int i = blockIdx.y;
    if (ids[i] < 0 || slot[ids[i]] < 0)
        return;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < F) {
        float g = gu[(int64_t)i * 2 * F + j], u = gu[(int64_t)i * 2 * F + F + j];
        act[(int64_t)i * F + j] = g / (1.0f + expf(-g)) * u;
    }
}

static __global__ void ex_combine_kernel(float *x, int64_t ldx, const float *out, int D, int K, const int32_t *ids,
                                         const float *w, const int32_t *slot)
{
    const int t = blockIdx.y;
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D)
        return;
    float acc = 0;
    int any = 0;
    for (int k = 0; k < K; k++) {
        int i = t * K + k;
        if (ids[i] >= 0 && slot[ids[i]] >= 0) {
            acc += w[i] * out[(int64_t)i * D + d];
            any = 1;
        }
    }
    if (any)
        x[(int64_t)t * ldx + d] += acc;
}

template <typename WT>
static void ex_launch(gpu_ctx *c, const gpu_experts *ex, int TK, int K, const float *h, int64_t ldh,
                      const int32_t *ids, float *gu, float *act, float *out)
{
    const int D = ex->d_model, F = ex->d_ff;
    cudaStream_t s = c->s[GPU_MAIN];
    int vec_up = D % 8 == 0 && ldh % 4 == 0 && gpu_aligned16(h) && gpu_aligned16(ex->gate_up);
    int vec_dn = F % 8 == 0 && gpu_aligned16(act) && gpu_aligned16(ex->down);
    ex_gemv_kernel<WT><<<dim3(gpu_cdiv(2 * F, EX_WARPS), TK), 32 * EX_WARPS, 0, s>>>(
        gu, 2 * F, h, ldh, K, (const WT *)ex->gate_up, 2 * F, D, ids, ex->slot, vec_up);
    ex_act_kernel<<<dim3(gpu_cdiv(F, 256), TK), 256, 0, s>>>(act, gu, F, ids, ex->slot);
    ex_gemv_kernel<WT><<<dim3(gpu_cdiv(D, EX_WARPS), TK), 32 * EX_WARPS, 0, s>>>(
        out, D, act, F, 1, (const WT *)ex->down, D, F, ids, ex->slot, vec_dn);
}

extern "C" int gpu_moe_experts(gpu_ctx *c, const gpu_experts *ex, int T, int K, const float *h, int64_t ldh,
                               const int32_t *ids, const float *w, float *x, int64_t ldx, float *scratch)
{
    if (c->rc || T <= 0)
        return c->rc;
    const int TK = T * K, D = ex->d_model, F = ex->d_ff;
    if (TK > 65535)
        return gpu_fail(c, "GPU experts", "more than 65535 (token, expert) pairs in one call");
    if (gpu_moe_grouped_fits(c, ex, T, h, ldh))
        return gpu_moe_grouped(c, ex, T, K, h, ldh, ids, w, x, ldx, scratch);
    float *gu = scratch, *act = gu + (int64_t)TK * 2 * F, *out = act + (int64_t)TK * F;
    if (ex->dt == GPU_BF16)
        ex_launch<__nv_bfloat16>(c, ex, TK, K, h, ldh, ids, gu, act, out);
    else
        ex_launch<float>(c, ex, TK, K, h, ldh, ids, gu, act, out);
    if (gpu_launched(c, "GPU experts"))
        return c->rc;
    ex_combine_kernel<<<dim3(gpu_cdiv(D, 256), T), 256, 0, c->s[GPU_MAIN]>>>(x, ldx, out, D, K, ids, w, ex->slot);
    return gpu_launched(c, "GPU experts: combine");
}

/* ---- the CPU's result, read from pinned memory ------------------------------------- */
static __global__ void add_host_kernel(float *x, int64_t ldx, const float *y, int64_t ldy, int n)
{
    const int t = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        x[(int64_t)t * ldx + i] += __ldcv(y + (int64_t)t * ldy + i);
}

extern "C" int gpu_add_rows_host(gpu_ctx *c, float *x, int64_t ldx, const float *y_host, int64_t ldy, int T, int n)
{
    if (c->rc || T <= 0 || n <= 0)
        return c->rc;
    add_host_kernel<<<dim3(gpu_cdiv(n, 256), T), 256, 0, c->s[GPU_MAIN]>>>(x, ldx, y_host, ldy, n);
    return gpu_launched(c, "add rows from host");
}
