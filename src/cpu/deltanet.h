/*
 * deltanet.h - the Gated DeltaNet's CPU kernels (reference, fp32):
 * Qwen3.5-MoE and Qwen3-Next linear-attention layers.
 *
 * Per value head the layer keeps a matrix state S [dk][dv] (row i belongs to
 * key dimension i). One token with query q, key k (both L2-normalised, q
 * also scaled by 1/sqrt(dk)), value v, log-decay g <= 0 and rate beta does
 *     S = exp(g) * S
 *     S = S + k (beta (v - S^T k))^T        (the delta rule)
 *     o = S^T q
 * as transformers' torch_recurrent_gated_delta_rule. gdn_chunk computes the
 * same for a run of tokens of one head in chunks (the WY / UT form of
 * torch_chunk_gated_delta_rule): within a chunk the updates become small
 * triangular solves and matrix products, so prefill touches S once a chunk
 * instead of once a token.
 */
#ifndef TD_CPU_DELTANET_H
#define TD_CPU_DELTANET_H

#include <stdint.h>

/* One token of one head, in place on S [dk][dv]; o [dv]. */
void gdn_step(float *S, int dk, int dv, const float *q, const float *k, const float *v, float g, float beta,
              float *o);

/* n tokens of one head: q, k [n][ldk], v [n][ldv], g, beta [n] (stride
 * ldgb), o [n][ldo]; S [dk][dv] in and out. Tokens go in chunks of `chunk`
 * (1 = gdn_step token by token). scratch: gdn_chunk_scratch_floats(). */
void gdn_chunk(float *S, int dk, int dv, int n, const float *q, int64_t ldk_q, const float *k, int64_t ldk,
               const float *v, int64_t ldv, const float *g, const float *beta, int64_t ldgb, float *o, int64_t ldo,
               int chunk, float *scratch);
int64_t gdn_chunk_scratch_floats(int dk, int dv, int chunk);

/* x[0..n) *= 1 / sqrt(sum x^2 + eps) (the FLA l2norm transformers uses, eps 1e-6) */
void gdn_l2norm(float *x, int n, float eps);

/* out[i] = RMSNorm(x)[i] * w[i] * silu(z[i]) over n values (the gated norm) */
void gdn_gated_norm(float *out, const float *x, const float *z, const float *w, int n, float eps);

#endif
