/*
 * attn.h - causal attention over the KV cache, fp32 (reference and AVX-512).
 *
 * The cache is laid out per sequence: sequence s, position j starts at
 * base + s * seq_stride + j * row_stride. Each token t of the batch attends
 * to positions [max(0, pos[t] - window + 1), pos[t]] of its own sequence; the
 * caller has already written this batch's keys/values into the cache, so
 * tokens of one sequence in one batch see each other causally.
 *
 * The references split work over (token, head) pairs on the pool; the fast
 * GQA kernel over (query tile, KV head) items (attn_avx512.c). Scratch: each pool
 * thread owns scratch + tid * scratch_stride floats, at least
 * attn_scratch_floats() of them.
 */
#ifndef TD_CPU_ATTN_H
#define TD_CPU_ATTN_H

#include <stdint.h>

#include "core/pool.h"
#include "cpu/ops.h"

typedef struct {
    int n_head, n_kv_head, head_dim;
    float scale;
    int window;                /* 0 = unlimited */
    const float *k, *v;        /* cache bases */
    int64_t seq_stride;        /* floats per sequence */
    int64_t row_stride;        /* floats per position (n_kv_head * head_dim) */
} attn_gqa_params;

/* q [T][n_head*head_dim] (rope applied); out [T][n_head*head_dim]. The
 * kernel set of isa_current(): on AVX-512, head_dim % 16 == 0, the
 * flash-style kernel of attn_avx512.c (scratch_stride >= attn_scratch_floats
 * with this head_dim); else the reference. */
void attn_gqa(pool *p, const attn_gqa_params *a, int T, const float *q, const int32_t *seq, const int32_t *pos,
              float *out, float *scratch, int64_t scratch_stride);
/* the scalar reference: one (token, head) pair per work item, the whole row
 * of scores at once */
void attn_gqa_ref(pool *p, const attn_gqa_params *a, int T, const float *q, const int32_t *seq, const int32_t *pos,
                  float *out, float *scratch, int64_t scratch_stride);

typedef struct {
    int n_head, nope, rope, v_dim, rank;
    float scale;
    const float *ckv, *kpe;    /* latent cache [.][rank] and rope-key cache [.][rope] */
    int64_t ckv_seq_stride, kpe_seq_stride;
    const mat *kv_b;           /* [n_head*(nope+v_dim)][rank] */
} attn_mla_params;

/* q [T][n_head*(nope+rope)] with the rope part already rotated; out
 * [T][n_head*v_dim]. Uses the absorbed form: q_nope is folded into the
 * latent space through kv_b, scores and the weighted sum are taken over the
 * latent cache, and kv_b's value rows expand the result per head. */
void attn_mla(pool *p, const attn_mla_params *a, int T, const float *q, const int32_t *seq, const int32_t *pos,
              float *out, float *scratch, int64_t scratch_stride);

/* Scratch floats per thread for a context of n_ctx positions. */
int64_t attn_scratch_floats(int n_ctx, int mla_rank, int head_dim);

#endif
