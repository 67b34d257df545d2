/*
 * gpu_attn.cu - causal attention over the KV cache in GPU memory: GQA, and
 * MLA in the absorbed form (src/cpu/attn.c is the reference for both).
 *
 * One block per (token, head) with ATT_WARPS warps. Warp w takes keys
 * lo+w, lo+w+ATT_WARPS, ...; for each key the warp forms the score with a
 * lane-strided dot product (coalesced reads of the key row), then folds it
 * into a running softmax (max m, sum l, and the weighted value sum, whose
 * head_dim floats are spread over the lanes, VPL per lane). The warps' states
 * are merged at the end in shared memory. This is the online softmax: the
 * result equals softmax-then-sum up to fp32 rounding, and it needs no
 * scratch proportional to the context, so prefill and decode share it.
 * Positions and sequence ids are read on the device, so a captured graph
 * serves every decode step.
 *
 * That kernel is latency-bound at decode: a warp walks its keys one after
 * another, each a dependent chain of load, shuffle-reduce and exp, and only
 * T * n_head blocks run (32 for Qwen3 at batch 1). For T <= 16 the decode
 * kernel below splits the keys instead (see its comment); for passes of
 * AT_BQ tokens or more with head_dim 64 or 128, the tiled kernel takes a
 * tile of tokens against tiles of keys.
 *
 * MLA: (1) q_lat[t][h] = q_nope[t][h] . W_uk[h] (kv_b's key rows),
 * (2) attention of [q_lat | q_pe] against [ckv | kpe] with ckv as values,
 * giving o_lat[t][h] (both in the caller's scratch), (3) out[t][h] =
 * W_uv[h] . o_lat[t][h] (kv_b's value rows).
 */
#include "cuda/gpu_internal.cuh"

enum { ATT_WARPS = 8 };

/* Running softmax state of one warp; o[] holds dims lane + 32*v. */
template <int VPL>
struct att_state {
    float m, l, o[VPL];
};

template <int VPL>
static __device__ __forceinline__ void att_fold(att_state<VPL> &st, float s, const float *vrow, int vdim, int lane)
{
    float m_new = fmaxf(st.m, s);
    float corr = expf(st.m - m_new); /* 0 while m is -inf */
    float p = expf(s - m_new);
    st.l = st.l * corr + p;
#pragma unroll
    for (int v = 0; v < VPL; v++) {
        int d = lane + 32 * v;
        float val = d < vdim ? vrow[d] : 0.0f;
        st.o[v] = st.o[v] * corr + p * val;
    }
    st.m = m_new;
}

/* Merge the warps' states; writes vdim floats to out. sm: ATT_WARPS*(2+32*VPL) floats. */
template <int VPL>
static __device__ void att_merge(const att_state<VPL> &st, float *sm, float *out, int vdim)
{
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *ms = sm, *ls = sm + ATT_WARPS, *os = sm + 2 * ATT_WARPS;
    if (lane == 0) {
        ms[w] = st.m;
        ls[w] = st.l;
    }
#pragma unroll
    for (int v = 0; v < VPL; v++)
        os[w * 32 * VPL + lane + 32 * v] = st.o[v];
    __syncthreads();
    float M = -INFINITY;
    for (int i = 0; i < ATT_WARPS; i++)
        M = fmaxf(M, ms[i]);
    float L = 0;
    for (int i = 0; i < ATT_WARPS; i++)
        L += ls[i] > 0 ? ls[i] * expf(ms[i] - M) : 0.0f;
    const float inv = 1.0f / L;
    for (int d = threadIdx.x; d < vdim; d += blockDim.x) {
        int v = d / 32, ln = d % 32;
        float acc = 0;
        for (int i = 0; i < ATT_WARPS; i++)
            if (ls[i] > 0)
                acc += os[i * 32 * VPL + ln + 32 * v] * expf(ms[i] - M);
        out[d] = acc * inv;
    }
}

/* ---- GQA ------------------------------------------------------------------------- */
template <int VPL>
static __global__ void gqa_kernel(gpu_gqa a, const float *q, int64_t ldq, const int32_t *seq, const int32_t *pos,
                                  float *out, int64_t ldo)
{
    extern __shared__ float sm[];
    const int t = blockIdx.x, h = blockIdx.y, hd = a.head_dim;
    const int g = h / (a.n_head / a.n_kv_head);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int p = pos[t];
    const int lo = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
    float *qs = sm + ATT_WARPS * (2 + 32 * VPL);
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        qs[d] = q[(int64_t)t * ldq + (int64_t)h * hd + d];
    __syncthreads();
    const float *K = a.k + (int64_t)seq[t] * a.seq_stride + (int64_t)g * hd;
    const float *V = a.v + (int64_t)seq[t] * a.seq_stride + (int64_t)g * hd;
    att_state<VPL> st;
    st.m = -INFINITY;
    st.l = 0;
#pragma unroll
    for (int v = 0; v < VPL; v++)
        st.o[v] = 0;
    for (int j = lo + w; j <= p; j += ATT_WARPS) {
        const float *kr = K + (int64_t)j * a.row_stride;
        float s = 0;
#pragma unroll
        for (int v = 0; v < VPL; v++) {
            int d = lane + 32 * v;
            if (d < hd)
                s += qs[d] * kr[d];
        }
        s = warp_sum(s) * a.scale;
        att_fold<VPL>(st, s, V + (int64_t)j * a.row_stride, hd, lane);
    }
    att_merge<VPL>(st, sm, out + (int64_t)t * ldo + (int64_t)h * hd, hd);
}

template <int VPL>
static void gqa_launch(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                       const int32_t *pos, float *out, int64_t ldo)
{
    size_t smem = (size_t)(ATT_WARPS * (2 + 32 * VPL) + a->head_dim) * sizeof(float);
    gqa_kernel<VPL><<<dim3(T, a->n_head), 32 * ATT_WARPS, smem, c->s[GPU_MAIN]>>>(*a, q, ldq, seq, pos, out, ldo);
}

/* ---- GQA, decode: the keys split across blocks ------------------------------------
 * Grid (splits, n_kv_head, T), AD_THREADS threads. A block takes the G =
 * n_head / n_kv_head query heads that share one kv head, so each key and
 * value row is read once per group, over its share of the token's keys. In
 * tiles of AD_TILE keys:
 *   (1) four adjacent threads form the G scores of one key: each reads every
 *       fourth 16-byte piece of the K row (all its loads issued together;
 *       the four cover 64 contiguous bytes per step), the queries broadcast
 *       from shared memory, two shuffles add the four parts;
 *   (2) per head (a warp each) the tile's max and exponentials, folded into
 *       the running max m and sum l (online softmax);
 *   (3) warp w adds p * v over keys w, w + 8, ... with lanes over the head's
 *       dims (coalesced V rows), its sums rescaled when m moves.
 * The warps' sums meet in shared memory. The grid's split count is fixed
 * when the kernel is launched (a captured graph serves every later step),
 * so each block derives the split count its token needs on the device
 * (AD_MIN_KEYS keys per split at least) and surplus blocks leave at once.
 * With more than one split, each writes (m, l, o) per head to the context's
 * scratch, and the last one to finish (an atomic counter per (token, kv
 * head), which that block resets) merges them in split order, so the
 * result does not depend on timing. Numerics as the first kernel: scores
 * dot * scale in fp32, expf, fp32 sums (order differs). */
enum {
    AD_THREADS = 256,
    AD_WARPS = AD_THREADS / 32,
    AD_TILE = AD_THREADS / 4, /* keys per tile: four threads per key in (1) */
    AD_MIN_KEYS = 64,
    AD_MAX_SPLIT = 32
};

template <int VPL4, int GMAX>
static __global__ void __launch_bounds__(AD_THREADS, 1)
    gqa_dec_kernel(gpu_gqa a, const float *q, int64_t ldq, const int32_t *seq, const int32_t *pos, float *out,
                   int64_t ldo, float *part, int *cnt, int nsg)
{
    extern __shared__ float4 sm4[]; /* float4: 16-byte aligned for the vector reads below */
    float *sm = (float *)sm4;
    __shared__ int is_last;
    const int split = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
    const int hd = a.head_dim, hd4 = hd >> 2, G = a.n_head / a.n_kv_head, KH = a.n_kv_head;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kq = threadIdx.x & 3, kl = threadIdx.x >> 2;
    const int p = pos[t];
    const int lo = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
    const int n = p - lo + 1;
    int ns = (n + AD_MIN_KEYS - 1) / AD_MIN_KEYS;
    ns = ns < nsg ? ns : nsg;
    if (split >= ns)
        return;
    const int per = (n + ns - 1) / ns, j0 = lo + split * per, j1 = j0 + per < p + 1 ? j0 + per : p + 1;
    float *qs = sm;                   /* [G][hd] */
    float *sc = qs + G * hd;          /* [G][AD_TILE] scores, then exponentials */
    float *mrow = sc + G * AD_TILE;   /* [G] running max */
    float *lrow = mrow + GMAX;        /* [G] running sum */
    float *crow = lrow + GMAX;        /* [G] rescale of the current tile */
    float *red = crow + GMAX;         /* [AD_WARPS][hd] */
    const int64_t h0 = (int64_t)kvh * G;
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x)
        qs[i] = q[(int64_t)t * ldq + h0 * hd + i];
    if (threadIdx.x < G) {
        mrow[threadIdx.x] = -INFINITY;
        lrow[threadIdx.x] = 0.0f;
    }
    __syncthreads();
    const float *Kb = a.k + (int64_t)seq[t] * a.seq_stride + (int64_t)kvh * hd;
    const float *Vb = a.v + (int64_t)seq[t] * a.seq_stride + (int64_t)kvh * hd;
    const float4 *qs4 = (const float4 *)qs;
    float4 acc[GMAX][VPL4];
#pragma unroll
    for (int g = 0; g < GMAX; g++)
#pragma unroll
        for (int v = 0; v < VPL4; v++)
            acc[g][v] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int jt = j0; jt < j1; jt += AD_TILE) {
        const int nk = j1 - jt < AD_TILE ? j1 - jt : AD_TILE;
        /* (1) scores of key jt + kl, a quarter of its dims per thread */
        {
            float s[GMAX];
#pragma unroll
            for (int g = 0; g < GMAX; g++)
                s[g] = 0.0f;
            if (kl < nk) {
                const float4 *kr = (const float4 *)(Kb + (int64_t)(jt + kl) * a.row_stride);
#pragma unroll 8
                for (int c4 = kq; c4 < hd4; c4 += 4) {
                    const float4 kv = __ldg(kr + c4);
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g < G) {
                            const float4 qv = qs4[g * hd4 + c4];
                            s[g] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g < G) {
                    s[g] += __shfl_xor_sync(0xffffffffu, s[g], 1);
                    s[g] += __shfl_xor_sync(0xffffffffu, s[g], 2);
                    if (kl < nk && kq == 0)
                        sc[g * AD_TILE + kl] = s[g] * a.scale;
                }
            }
        }
        __syncthreads();
        /* (2) the tile's softmax terms, one warp per head */
        for (int g = warp; g < G; g += AD_WARPS) {
            float *sg = sc + g * AD_TILE;
            float mx = -INFINITY;
            for (int i = lane; i < nk; i += 32)
                mx = fmaxf(mx, sg[i]);
            mx = warp_max(mx);
            const float m_old = mrow[g], m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int i = lane; i < nk; i += 32) {
                const float e = expf(sg[i] - m_new);
                sg[i] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float corr = expf(m_old - m_new); /* 0 on the first tile: m_old is -inf */
                crow[g] = corr;
                lrow[g] = lrow[g] * corr + sum;
                mrow[g] = m_new;
            }
        }
        __syncthreads();
        /* (3) values */
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            if (g < G) {
                const float cr = crow[g];
#pragma unroll
                for (int v = 0; v < VPL4; v++) {
                    acc[g][v].x *= cr, acc[g][v].y *= cr, acc[g][v].z *= cr, acc[g][v].w *= cr;
                }
            }
        }
#pragma unroll 4
        for (int i = warp; i < nk; i += AD_WARPS) {
            const float4 *vr = (const float4 *)(Vb + (int64_t)(jt + i) * a.row_stride);
#pragma unroll
            for (int v = 0; v < VPL4; v++) {
                const int c4 = lane + 32 * v;
                if (c4 < hd4) {
                    const float4 vv = __ldg(vr + c4);
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g < G) {
                            const float pg = sc[g * AD_TILE + i];
                            acc[g][v].x += pg * vv.x, acc[g][v].y += pg * vv.y;
                            acc[g][v].z += pg * vv.z, acc[g][v].w += pg * vv.w;
                        }
                    }
                }
            }
        }
        __syncthreads(); /* sc is rewritten by the next tile */
    }
    /* the warps' sums, head by head; then the result (one split) or the partial */
    const int64_t pbase = (((int64_t)t * KH + kvh) * nsg + split) * G * (hd + 2);
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g < G) {
#pragma unroll
            for (int v = 0; v < VPL4; v++) {
                const int c4 = lane + 32 * v;
                if (c4 < hd4)
                    ((float4 *)(red + warp * hd))[c4] = acc[g][v];
            }
            __syncthreads();
            for (int d = threadIdx.x; d < hd; d += blockDim.x) {
                float o = 0.0f;
                for (int w = 0; w < AD_WARPS; w++)
                    o += red[w * hd + d];
                if (ns == 1)
                    out[(int64_t)t * ldo + (h0 + g) * hd + d] = o / lrow[g];
                else
                    part[pbase + (int64_t)g * (hd + 2) + d] = o;
            }
            if (ns > 1 && threadIdx.x == 0) {
                part[pbase + (int64_t)g * (hd + 2) + hd] = mrow[g];
                part[pbase + (int64_t)g * (hd + 2) + hd + 1] = lrow[g];
            }
            __syncthreads(); /* red is rewritten for the next head */
        }
    }
    if (ns == 1)
        return;
    /* the last split of (t, kv head) to finish merges all of them */
    __threadfence();
    __syncthreads();
    int *counter = cnt + (int64_t)t * KH + kvh;
    if (threadIdx.x == 0)
        is_last = atomicAdd(counter, 1) == ns - 1;
    __syncthreads();
    if (!is_last)
        return;
    const int64_t base0 = ((int64_t)t * KH + kvh) * nsg * G * (hd + 2), sstride = (int64_t)G * (hd + 2);
    /* every split's (m, l) into shared memory (sc is free: G * AD_TILE >= 2 * G * AD_MAX_SPLIT) */
    float *mf = sc, *lf = sc + G * AD_MAX_SPLIT;
    for (int i = threadIdx.x; i < G * ns; i += blockDim.x) {
        const int g = i / ns, sp = i % ns;
        const float *pg = part + base0 + sp * sstride + (int64_t)g * (hd + 2);
        mf[g * AD_MAX_SPLIT + sp] = __ldcg(pg + hd);
        lf[g * AD_MAX_SPLIT + sp] = __ldcg(pg + hd + 1);
    }
    __syncthreads();
    if (threadIdx.x < G) { /* per head: the common max, the weight of each split, the sum */
        const int g = threadIdx.x;
        float M = -INFINITY, L = 0.0f;
        for (int sp = 0; sp < ns; sp++)
            if (lf[g * AD_MAX_SPLIT + sp] > 0.0f)
                M = fmaxf(M, mf[g * AD_MAX_SPLIT + sp]);
        for (int sp = 0; sp < ns; sp++) {
            const float l = lf[g * AD_MAX_SPLIT + sp];
            const float f = l > 0.0f ? expf(mf[g * AD_MAX_SPLIT + sp] - M) : 0.0f;
            mf[g * AD_MAX_SPLIT + sp] = f;
            L += l * f;
        }
        lrow[g] = L;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int g = i / hd, d = i % hd;
        const float *pg = part + base0 + (int64_t)g * (hd + 2) + d;
        float O = 0.0f;
#pragma unroll 8
        for (int sp = 0; sp < ns; sp++)
            O += __ldcg(pg + sp * sstride) * mf[g * AD_MAX_SPLIT + sp];
        out[(int64_t)t * ldo + (h0 + g) * hd + d] = O / lrow[g];
    }
    if (threadIdx.x == 0)
        *counter = 0; /* for the next launch (or graph replay) */
}

template <int VPL4, int GMAX>
static void gqa_dec_launch(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                           const int32_t *pos, float *out, int64_t ldo, int nsg)
{
    const int G = a->n_head / a->n_kv_head, hd = a->head_dim;
    size_t smem = (size_t)(G * hd + G * AD_TILE + 3 * GMAX + AD_WARPS * hd) * sizeof(float);
    gqa_dec_kernel<VPL4, GMAX><<<dim3(nsg, a->n_kv_head, T), AD_THREADS, smem, c->s[GPU_MAIN]>>>(
        *a, q, ldq, seq, pos, out, ldo, c->att_part, c->counters + GPU_CNT_ATT, nsg);
}

/* Whether the decode kernel applies; *nsg: the grid's split count. */
static int gqa_dec_plan(const gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, int *nsg)
{
    const int hd = a->head_dim, G = a->n_head / a->n_kv_head, KH = a->n_kv_head;
    if (!c->fast || T > 16 || hd % 4 || hd > 256 || G > (hd <= 128 ? 16 : 8) || ldq % 4 || a->row_stride % 4 ||
        a->seq_stride % 4 || !gpu_aligned16(q) || !gpu_aligned16(a->k) || !gpu_aligned16(a->v) ||
        (int64_t)T * KH > GPU_CNT_ATT_N)
        return 0;
    int n = 2 * c->n_sm / (T * KH);
    n = n < 1 ? 1 : n > AD_MAX_SPLIT ? AD_MAX_SPLIT : n;
    while (n > 1 && (int64_t)T * KH * n * G * (hd + 2) > GPU_ATT_PART_FLOATS)
        n /= 2;
    *nsg = n;
    return 1;
}

/* ---- GQA, long passes: tiles of queries against tiles of keys --------------------------
 * Grid (ceil(T / AT_BQ), n_head), AT_THREADS threads, head_dim HD of 64 or
 * 128. A block takes AT_BQ consecutive tokens of one head and walks the
 * keys of their sequence in tiles of AT_BK held in shared memory, so each
 * key row is read once per tile of tokens, not once per token as in the
 * first kernel (prefill at 4096 tokens spent about as long in attention as
 * in copying a layer's experts over PCIe). Per key tile:
 *   (1) scores: thread (ty, tx) forms tokens 2ty, 2ty+1 against keys
 *       tx + 16i, i < 4 (fp32, dot * scale as the reference); a key outside
 *       a token's causal window, or of another sequence, scores -inf;
 *   (2) warp w takes rows 4w..4w+3: the tile's max folded into the running
 *       max m, the exponentials p, the running sum l, the rescale factor;
 *   (3) the same warp updates those rows' outputs, held in registers, lanes
 *       over the head's dims: o = o * rescale + sum_k p_k v_k.
 * Tokens of several sequences in one tile (batched serving) are taken one
 * sequence at a time; the running state carries over. Online softmax in
 * fp32, as the first kernel: the sums' order differs from the reference's. */
enum { AT_BQ = 32, AT_BK = 64, AT_THREADS = 256 };

template <int HD>
static constexpr size_t at_smem_floats()
{
    return (size_t)AT_BQ * (HD + 1) + (size_t)AT_BK * (HD + 1) + (size_t)AT_BK * HD + (size_t)AT_BQ * (AT_BK + 1) +
           6 * AT_BQ;
}

template <int HD>
static __global__ void __launch_bounds__(AT_THREADS, 2) /* two blocks per SM: shared memory allows no more */
    gqa_tile_kernel(gpu_gqa a, int T, const float *q, int64_t ldq, const int32_t *seq, const int32_t *pos, float *out,
                    int64_t ldo)
{
    constexpr int DPT = HD / 32, QLD = HD + 1, KLD = HD + 1, PLD = AT_BK + 1;
    extern __shared__ float sm[];
    float *Qs = sm, *Ks = Qs + AT_BQ * QLD, *Vs = Ks + AT_BK * KLD, *Ps = Vs + AT_BK * HD;
    float *mrow = Ps + AT_BQ * PLD, *lrow = mrow + AT_BQ, *crow = lrow + AT_BQ;
    int *tseq = (int *)(crow + AT_BQ), *tlo = tseq + AT_BQ, *thi = tlo + AT_BQ;
    const int t0 = blockIdx.x * AT_BQ, h = blockIdx.y, g = h / (a.n_head / a.n_kv_head);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < AT_BQ * HD; i += AT_THREADS) {
        const int r = i / HD, d = i % HD, t = t0 + r;
        Qs[r * QLD + d] = t < T ? q[(int64_t)t * ldq + (int64_t)h * HD + d] : 0.0f;
    }
    if (tid < AT_BQ) {
        const int t = t0 + tid;
        const int p = t < T ? pos[t] : -1;
        tseq[tid] = t < T ? seq[t] : -1;
        thi[tid] = p;
        tlo[tid] = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
        mrow[tid] = -INFINITY;
        lrow[tid] = 0.0f;
    }
    float o[4][DPT];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < DPT; j++)
            o[i][j] = 0.0f;
    __syncthreads();
    const int ty = tid >> 4, tx = tid & 15;
    for (int r0 = 0; r0 < AT_BQ; r0++) {
        const int sq = tseq[r0];
        int first = sq >= 0, kmin = 0x7fffffff, kmax = -1;
        for (int r = 0; r < AT_BQ; r++) {
            first &= !(r < r0 && tseq[r] == sq);
            if (tseq[r] == sq) {
                kmin = min(kmin, tlo[r]);
                kmax = max(kmax, thi[r]);
            }
        }
        if (!first) /* the same in every thread: no divergence at the barriers below */
            continue;
        const float *K = a.k + (int64_t)sq * a.seq_stride + (int64_t)g * HD;
        const float *V = a.v + (int64_t)sq * a.seq_stride + (int64_t)g * HD;
        for (int kb = kmin; kb <= kmax; kb += AT_BK) {
            for (int i = tid; i < AT_BK * HD; i += AT_THREADS) {
                const int r = i / HD, d = i % HD, j = kb + r;
                const int64_t at = (int64_t)j * a.row_stride + d;
                Ks[r * KLD + d] = j <= kmax ? K[at] : 0.0f;
                Vs[r * HD + d] = j <= kmax ? V[at] : 0.0f;
            }
            __syncthreads();
            /* (1) scores */
            float acc[2][4] = { { 0, 0, 0, 0 }, { 0, 0, 0, 0 } };
#pragma unroll 8
            for (int d = 0; d < HD; d++) {
                const float q0 = Qs[(2 * ty) * QLD + d], q1 = Qs[(2 * ty + 1) * QLD + d];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const float k = Ks[(tx + 16 * i) * KLD + d];
                    acc[0][i] = fmaf(q0, k, acc[0][i]);
                    acc[1][i] = fmaf(q1, k, acc[1][i]);
                }
            }
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int r = 2 * ty + u;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int j = kb + tx + 16 * i;
                    const bool ok = tseq[r] == sq && j >= tlo[r] && j <= thi[r];
                    Ps[r * PLD + tx + 16 * i] = ok ? acc[u][i] * a.scale : -INFINITY;
                }
            }
            __syncthreads();
            /* (2) softmax of rows 4w..4w+3 */
            float corr[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = 4 * warp + i;
                const float s0 = Ps[r * PLD + lane], s1 = Ps[r * PLD + lane + 32];
                float mt = fmaxf(s0, s1);
                for (int off = 16; off > 0; off >>= 1)
                    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
                const float m_old = mrow[r], m_new = fmaxf(m_old, mt);
                float p0 = 0.0f, p1 = 0.0f;
                corr[i] = 1.0f;
                if (m_new != -INFINITY) {
                    p0 = expf(s0 - m_new);
                    p1 = expf(s1 - m_new);
                    corr[i] = expf(m_old - m_new); /* 0 while m was -inf */
                }
                float ps = p0 + p1;
                for (int off = 16; off > 0; off >>= 1)
                    ps += __shfl_xor_sync(0xffffffffu, ps, off);
                Ps[r * PLD + lane] = p0;
                Ps[r * PLD + lane + 32] = p1;
                __syncwarp();
                if (lane == 0) {
                    mrow[r] = m_new;
                    lrow[r] = lrow[r] * corr[i] + ps;
                }
            }
            __syncwarp();
            /* (3) their outputs: each v row read once for the four rows */
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < DPT; j++)
                    o[i][j] *= corr[i];
            for (int k = 0; k < AT_BK; k++) {
                float v[DPT], pk[4];
#pragma unroll
                for (int j = 0; j < DPT; j++)
                    v[j] = Vs[k * HD + lane + 32 * j];
#pragma unroll
                for (int i = 0; i < 4; i++)
                    pk[i] = Ps[(4 * warp + i) * PLD + k];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < DPT; j++)
                        o[i][j] = fmaf(pk[i], v[j], o[i][j]);
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = 4 * warp + i, t = t0 + r;
        if (t < T) {
            const float l = lrow[r], inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
            for (int j = 0; j < DPT; j++)
                out[(int64_t)t * ldo + (int64_t)h * HD + lane + 32 * j] = o[i][j] * inv;
        }
    }
}

template <int HD>
static void gqa_tile_launch(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                            const int32_t *pos, float *out, int64_t ldo)
{
    const size_t smem = at_smem_floats<HD>() * sizeof(float);
    gqa_tile_kernel<HD><<<dim3(gpu_cdiv(T, AT_BQ), a->n_head), AT_THREADS, smem, c->s[GPU_MAIN]>>>(
        *a, T, q, ldq, seq, pos, out, ldo);
}

/* The tiled kernel's shared memory (91 KB at head_dim 128) is above the 48 KB a launch gets without asking: asked
 * once per context (gpu_ctx_create), not at a launch that a graph capture may be recording. */
int gpu_attn_prepare(gpu_ctx *c)
{
    if (gpu_check(c, cudaFuncSetAttribute(gqa_tile_kernel<64>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)(at_smem_floats<64>() * sizeof(float))),
                  "attention: shared memory of the tiled kernel"))
        return c->rc;
    return gpu_check(c, cudaFuncSetAttribute(gqa_tile_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)(at_smem_floats<128>() * sizeof(float))),
                     "attention: shared memory of the tiled kernel");
}

extern "C" int gpu_attn_gqa(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                            const int32_t *pos, float *out, int64_t ldo)
{
    if (c->rc || T <= 0)
        return c->rc;
    if (a->n_kv_head <= 0 || a->n_head % a->n_kv_head != 0)
        return gpu_fail(c, "attention", "n_head is not a multiple of n_kv_head");
    int nsg = 0;
    if (gqa_dec_plan(c, a, T, q, ldq, &nsg)) {
        const int G = a->n_head / a->n_kv_head;
        if (a->head_dim <= 128) {
            if (G <= 4)
                gqa_dec_launch<1, 4>(c, a, T, q, ldq, seq, pos, out, ldo, nsg);
            else if (G <= 8)
                gqa_dec_launch<1, 8>(c, a, T, q, ldq, seq, pos, out, ldo, nsg);
            else
                gqa_dec_launch<1, 16>(c, a, T, q, ldq, seq, pos, out, ldo, nsg);
        } else {
            if (G <= 4)
                gqa_dec_launch<2, 4>(c, a, T, q, ldq, seq, pos, out, ldo, nsg);
            else
                gqa_dec_launch<2, 8>(c, a, T, q, ldq, seq, pos, out, ldo, nsg);
        }
        return gpu_launched(c, "attention (GQA, decode kernel)");
    }
    if (c->fast && T >= AT_BQ && (a->head_dim == 64 || a->head_dim == 128)) {
        if (a->head_dim == 64)
            gqa_tile_launch<64>(c, a, T, q, ldq, seq, pos, out, ldo);
        else
            gqa_tile_launch<128>(c, a, T, q, ldq, seq, pos, out, ldo);
        return gpu_launched(c, "attention (GQA, tiled kernel)");
    }
    int vpl = (a->head_dim + 31) / 32;
    if (vpl <= 1)
        gqa_launch<1>(c, a, T, q, ldq, seq, pos, out, ldo);
    else if (vpl <= 2)
        gqa_launch<2>(c, a, T, q, ldq, seq, pos, out, ldo);
    else if (vpl <= 4)
        gqa_launch<4>(c, a, T, q, ldq, seq, pos, out, ldo);
    else if (vpl <= 8)
        gqa_launch<8>(c, a, T, q, ldq, seq, pos, out, ldo);
    else
        return gpu_fail(c, "attention", "head_dim above 256 is not supported yet");
    return gpu_launched(c, "attention (GQA)");
}

/* ---- MLA ----------------------------------------------------------------------------- */
/* (1) grid (T, H): q_lat[t][h][r] = sum_d q[t][h][d] * kv_b[h*(nope+v)+d][r], d < nope. */
template <typename WT>
static __global__ void mla_absorb_kernel(gpu_mla a, const WT *kvb, const float *q, int64_t ldq, float *q_lat)
{
    extern __shared__ float qn[];
    const int t = blockIdx.x, h = blockIdx.y, R = a.rank, qk = a.nope + a.rope;
    for (int d = threadIdx.x; d < a.nope; d += blockDim.x)
        qn[d] = q[(int64_t)t * ldq + (int64_t)h * qk + d];
    __syncthreads();
    const WT *W = kvb + (int64_t)h * (a.nope + a.v_dim) * R;
    float *o = q_lat + ((int64_t)t * a.n_head + h) * R;
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        float acc = 0;
        for (int d = 0; d < a.nope; d++)
            acc += qn[d] * gpu_ld(W, (int64_t)d * R + r);
        o[r] = acc;
    }
}

/* (2) grid (T, H): scores over [ckv | kpe], values ckv; o_lat [T][H][R]. */
template <int VPL>
static __global__ void mla_attn_kernel(gpu_mla a, const float *q, int64_t ldq, const float *q_lat,
                                       const int32_t *seq, const int32_t *pos, float *o_lat)
{
    extern __shared__ float sm[];
    const int t = blockIdx.x, h = blockIdx.y, R = a.rank, qk = a.nope + a.rope;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int p = pos[t];
    float *ql = sm + ATT_WARPS * (2 + 32 * VPL), *qp = ql + R;
    for (int d = threadIdx.x; d < R; d += blockDim.x)
        ql[d] = q_lat[((int64_t)t * a.n_head + h) * R + d];
    for (int d = threadIdx.x; d < a.rope; d += blockDim.x)
        qp[d] = q[(int64_t)t * ldq + (int64_t)h * qk + a.nope + d];
    __syncthreads();
    const float *C = a.ckv + (int64_t)seq[t] * a.ckv_seq_stride;
    const float *P = a.kpe + (int64_t)seq[t] * a.kpe_seq_stride;
    att_state<VPL> st;
    st.m = -INFINITY;
    st.l = 0;
#pragma unroll
    for (int v = 0; v < VPL; v++)
        st.o[v] = 0;
    for (int j = w; j <= p; j += ATT_WARPS) {
        const float *cr = C + (int64_t)j * R, *pr = P + (int64_t)j * a.rope;
        float s1 = 0, s2 = 0;
#pragma unroll
        for (int v = 0; v < VPL; v++) {
            int d = lane + 32 * v;
            if (d < R)
                s1 += ql[d] * cr[d];
        }
        for (int d = lane; d < a.rope; d += 32)
            s2 += qp[d] * pr[d];
        float s = (warp_sum(s1) + warp_sum(s2)) * a.scale;
        att_fold<VPL>(st, s, cr, R, lane);
    }
    att_merge<VPL>(st, sm, o_lat + ((int64_t)t * a.n_head + h) * R, R);
}

/* (3) grid (T, H), one warp per output dim: out[t][h*v+d] = kv_b[h*(nope+v)+nope+d] . o_lat[t][h]. */
template <typename WT>
static __global__ void mla_expand_kernel(gpu_mla a, const WT *kvb, const float *o_lat, float *out, int64_t ldo)
{
    const int t = blockIdx.x, h = blockIdx.y, R = a.rank;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float *ol = o_lat + ((int64_t)t * a.n_head + h) * R;
    for (int d = w; d < a.v_dim; d += blockDim.x >> 5) {
        const WT *row = kvb + ((int64_t)h * (a.nope + a.v_dim) + a.nope + d) * R;
        float s = 0;
        for (int r = lane; r < R; r += 32)
            s += gpu_ld(row, r) * ol[r];
        s = warp_sum(s);
        if (lane == 0)
            out[(int64_t)t * ldo + (int64_t)h * a.v_dim + d] = s;
    }
}

template <int VPL>
static void mla_attn_launch(gpu_ctx *c, const gpu_mla *a, int T, const float *q, int64_t ldq, const float *q_lat,
                            const int32_t *seq, const int32_t *pos, float *o_lat)
{
    size_t smem = (size_t)(ATT_WARPS * (2 + 32 * VPL) + a->rank + a->rope) * sizeof(float);
    if (smem > 48 * 1024)
        cudaFuncSetAttribute(mla_attn_kernel<VPL>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    mla_attn_kernel<VPL><<<dim3(T, a->n_head), 32 * ATT_WARPS, smem, c->s[GPU_MAIN]>>>(*a, q, ldq, q_lat, seq, pos,
                                                                                       o_lat);
}

extern "C" int gpu_attn_mla(gpu_ctx *c, const gpu_mla *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                            const int32_t *pos, float *out, int64_t ldo, float *scratch)
{
    if (c->rc || T <= 0)
        return c->rc;
    cudaStream_t s = c->s[GPU_MAIN];
    float *q_lat = scratch, *o_lat = scratch + (int64_t)T * a->n_head * a->rank;
    dim3 grid(T, a->n_head);
    size_t qsm = (size_t)(a->nope > 0 ? a->nope : 1) * sizeof(float);
    if (a->kv_b.dt == GPU_BF16)
        mla_absorb_kernel<<<grid, 256, qsm, s>>>(*a, (const __nv_bfloat16 *)a->kv_b.data, q, ldq, q_lat);
    else
        mla_absorb_kernel<<<grid, 256, qsm, s>>>(*a, (const float *)a->kv_b.data, q, ldq, q_lat);
    if (gpu_launched(c, "MLA: absorb"))
        return c->rc;
    int vpl = (a->rank + 31) / 32;
    if (vpl <= 1)
        mla_attn_launch<1>(c, a, T, q, ldq, q_lat, seq, pos, o_lat);
    else if (vpl <= 2)
        mla_attn_launch<2>(c, a, T, q, ldq, q_lat, seq, pos, o_lat);
    else if (vpl <= 4)
        mla_attn_launch<4>(c, a, T, q, ldq, q_lat, seq, pos, o_lat);
    else if (vpl <= 8)
        mla_attn_launch<8>(c, a, T, q, ldq, q_lat, seq, pos, o_lat);
    else if (vpl <= 16)
        mla_attn_launch<16>(c, a, T, q, ldq, q_lat, seq, pos, o_lat);
    else
        return gpu_fail(c, "attention", "MLA kv_lora_rank above 512 is not supported yet");
    if (gpu_launched(c, "MLA: attention"))
        return c->rc;
    if (a->kv_b.dt == GPU_BF16)
        mla_expand_kernel<<<grid, 256, 0, s>>>(*a, (const __nv_bfloat16 *)a->kv_b.data, o_lat, out, ldo);
    else
        mla_expand_kernel<<<grid, 256, 0, s>>>(*a, (const float *)a->kv_b.data, o_lat, out, ldo);
    return gpu_launched(c, "MLA: expand");
}
