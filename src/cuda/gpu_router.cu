/*
 * gpu_router.cu - top-k expert selection on the GPU, the rules of
 * src/cpu/router.c step for step (see there for the formulas):
 *   softmax (max subtracted, fp32 expf, sum in double), sigmoid + bias,
 *   group ranking (max, or the sum of the best two), then k rounds of
 *   "largest allowed choice, ties to the lower expert id", renormalisation
 *   (sigmoid: by sum + 1e-20) and the routed scaling factor.
 * One block per token; the k rounds are block-wide argmax reductions over
 * (value, id) pairs, so the tie rule is exactly the CPU's.
 */
#include "cuda/gpu_internal.cuh"

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

extern "C" int gpu_route(gpu_ctx *c, const gpu_route_params *r, int T, const float *logits, int32_t *ids, float *w)
{
    if (c->rc || T <= 0)
        return c->rc;
    int G = r->n_group > 0 ? r->n_group : 1;
    if (r->n_expert < 1 || r->n_expert % G != 0 || r->k < 1 || r->k > r->n_expert || r->topk_group > G)
        return gpu_fail(c, "route", "inconsistent routing parameters");
    size_t smem = (size_t)(2 * r->n_expert + G) * sizeof(float) + (size_t)(r->n_expert + G);
    if (smem > 48 * 1024)
        return gpu_fail(c, "route", "more than 5000 experts are not supported");
    route_kernel<<<T, RT_THREADS, smem, c->s[GPU_MAIN]>>>(*r, logits, ids, w);
    return gpu_launched(c, "route");
}
