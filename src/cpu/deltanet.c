/*
 * deltanet.c - Gated DeltaNet kernels (reference, fp32); see deltanet.h.
 *
 * gdn_step follows transformers' recurrent form operation for operation.
 * gdn_chunk is the chunked form of torch_chunk_gated_delta_rule, per chunk
 * of c tokens with cumulative log-decay G_i = g_0 + .. + g_i:
 *   A[i][j] = beta_i (k_i . k_j) exp(G_i - G_j)        j < i
 *   (I + A) U = beta v,  (I + A) W = beta k exp(G)     (forward substitution)
 *   V' = U - W S
 *   o_i = exp(G_i) q_i^T S + sum_{j <= i} (q_i . k_j) exp(G_i - G_j) V'_j
 *   S  = exp(G_c-1) S + sum_j exp(G_c-1 - G_j) k_j V'_j^T
 * A last chunk shorter than `chunk` is what transformers' zero padding
 * computes (padded tokens have k = v = beta = g = 0).
 */
#include "cpu/deltanet.h"

#include <math.h>
#include <string.h>

void gdn_step(float *S, int dk, int dv, const float *q, const float *k, const float *v, float g, float beta,
              float *o)
{
    const float decay = expf(g);
    for (int i = 0; i < dk * dv; i++)
        S[i] *= decay;
    for (int j = 0; j < dv; j++) {
        float kv = 0; /* (S^T k)_j */
        for (int i = 0; i < dk; i++)
            kv += S[(int64_t)i * dv + j] * k[i];
        float delta = (v[j] - kv) * beta;
        for (int i = 0; i < dk; i++)
            S[(int64_t)i * dv + j] += k[i] * delta;
    }
    for (int j = 0; j < dv; j++) {
        float s = 0;
        for (int i = 0; i < dk; i++)
            s += S[(int64_t)i * dv + j] * q[i];
        o[j] = s;
    }
}

int64_t gdn_chunk_scratch_floats(int dk, int dv, int chunk)
{
    int64_t c = chunk;
    return 2 * c * c + 2 * c * dv + c * dk + c + 64;
}

static float dot(const float *a, const float *b, int n)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

void gdn_chunk(float *S, int dk, int dv, int n, const float *q, int64_t ldq, const float *k, int64_t ldk,
               const float *v, int64_t ldv, const float *g, const float *beta, int64_t ldgb, float *o, int64_t ldo,
               int chunk, float *scratch)
{
    if (chunk <= 1) {
        for (int t = 0; t < n; t++)
            gdn_step(S, dk, dv, q + t * ldq, k + t * ldk, v + t * ldv, g[t * ldgb], beta[t * ldgb], o + t * ldo);
        return;
    }
    const int C = chunk;
    float *A = scratch, *QK = A + (int64_t)C * C, *U = QK + (int64_t)C * C, *W = U + (int64_t)C * dv;
    float *G = W + (int64_t)C * dk, *Vn = U; /* V' overwrites U row by row */
    for (int t0 = 0; t0 < n; t0 += C) {
        const int c = n - t0 < C ? n - t0 : C;
        const float *qc = q + t0 * ldq, *kc = k + t0 * ldk, *vc = v + t0 * ldv;
        float acc = 0;
        for (int i = 0; i < c; i++)
            G[i] = acc += g[(t0 + i) * ldgb];
        for (int i = 0; i < c; i++)
            for (int j = 0; j < i; j++)
                A[i * C + j] = beta[(t0 + i) * ldgb] * dot(kc + i * ldk, kc + j * ldk, dk) * expf(G[i] - G[j]);
        /* U = (I + A)^-1 beta v, W = (I + A)^-1 beta k exp(G), by forward substitution */
        for (int i = 0; i < c; i++) {
            const float b = beta[(t0 + i) * ldgb], e = expf(G[i]);
            float *u = U + (int64_t)i * dv, *w = W + (int64_t)i * dk;
            for (int x = 0; x < dv; x++)
                u[x] = b * vc[i * ldv + x];
            for (int x = 0; x < dk; x++)
                w[x] = b * kc[i * ldk + x] * e;
            for (int j = 0; j < i; j++) {
                const float a = A[i * C + j];
                const float *uj = U + (int64_t)j * dv, *wj = W + (int64_t)j * dk;
                for (int x = 0; x < dv; x++)
                    u[x] -= a * uj[x];
                for (int x = 0; x < dk; x++)
                    w[x] -= a * wj[x];
            }
        }
        /* V' = U - W S */
        for (int i = 0; i < c; i++) {
            const float *w = W + (int64_t)i * dk;
            float *vn = Vn + (int64_t)i * dv;
            for (int x = 0; x < dk; x++) {
                const float wx = w[x], *Sx = S + (int64_t)x * dv;
                for (int y = 0; y < dv; y++)
                    vn[y] -= wx * Sx[y];
            }
        }
        /* outputs: the state as it was before the chunk, plus the chunk itself */
        for (int i = 0; i < c; i++) {
            const float *qi = qc + i * ldq, e = expf(G[i]);
            float *oi = o + (t0 + i) * ldo;
            for (int y = 0; y < dv; y++)
                oi[y] = 0;
            for (int x = 0; x < dk; x++) {
                const float qx = qi[x] * e, *Sx = S + (int64_t)x * dv;
                for (int y = 0; y < dv; y++)
                    oi[y] += qx * Sx[y];
            }
            for (int j = 0; j <= i; j++) {
                QK[i * C + j] = dot(qi, kc + j * ldk, dk) * expf(G[i] - G[j]);
                const float a = QK[i * C + j], *vn = Vn + (int64_t)j * dv;
                for (int y = 0; y < dv; y++)
                    oi[y] += a * vn[y];
            }
        }
        /* S = exp(G_last) S + sum_j exp(G_last - G_j) k_j V'_j^T */
        const float Gl = G[c - 1], el = expf(Gl);
        for (int x = 0; x < dk * dv; x++)
            S[x] *= el;
        for (int j = 0; j < c; j++) {
            const float ej = expf(Gl - G[j]), *kj = kc + j * ldk, *vn = Vn + (int64_t)j * dv;
            for (int x = 0; x < dk; x++) {
                const float kx = kj[x] * ej;
                float *Sx = S + (int64_t)x * dv;
                for (int y = 0; y < dv; y++)
                    Sx[y] += kx * vn[y];
            }
        }
    }
}

void gdn_l2norm(float *x, int n, float eps)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += x[i] * x[i];
    const float inv = 1.0f / sqrtf(s + eps);
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

void gdn_gated_norm(float *out, const float *x, const float *z, const float *w, int n, float eps)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += x[i] * x[i];
    const float inv = 1.0f / sqrtf(s / (float)n + eps);
    for (int i = 0; i < n; i++) {
        const float zi = z[i], silu = zi / (1.0f + expf(-zi));
        out[i] = w[i] * (x[i] * inv) * silu;
    }
}
