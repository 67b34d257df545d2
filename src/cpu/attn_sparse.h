/*
 * attn_sparse.h - DeepSeek sparse attention on the CPU (reference, fp32):
 * the lightning indexer's top-k selection and MLA over the selected positions.
 *
 * DeepSeek-V3.2 and GLM-5 let each token attend to at most index_topk past
 * positions of its sequence, the ones a small multi-head "indexer" scores
 * highest. Where a token has no more than index_topk positions to see, the
 * selection is all of them and the result is dense MLA exactly (the
 * selected positions are kept in ascending order, so even the summation
 * order matches attn_mla).
 *
 * Caches are laid out as in attn.h: sequence s, position j at
 * base + s * seq_stride + j * row. Work is split over tokens (indexer) or
 * (token, head) pairs (attention) on the pool; each pool thread owns
 * scratch + tid * scratch_stride floats.
 */
#ifndef TD_CPU_ATTN_SPARSE_H
#define TD_CPU_ATTN_SPARSE_H

#include <stdint.h>

#include "core/pool.h"
#include "cpu/attn.h"

typedef struct {
    int n_head, head_dim, topk;
    float scale;               /* head_dim^-0.5 */
    const float *k;            /* indexer key cache base, rows of head_dim */
    int64_t seq_stride;        /* floats per sequence */
} dsa_index_params;

/* Per token t (position pos[t] of sequence seq[t]), the score of each past
 * position j <= pos[t] is
 *     s_j = sum_h w[t][h] * relu(scale * q[t][h] . k[j])
 * (q [T][n_head*head_dim] with rope applied; w [T][n_head], the weights
 * projection already multiplied by n_head^-0.5). sel[t*sel_stride ..] gets
 * the n_sel[t] = min(topk, pos[t] + 1) best positions in ascending order;
 * equal scores prefer the earlier position. */
void dsa_index_select(pool *p, const dsa_index_params *a, int T, const float *q, const float *w,
                      const int32_t *seq, const int32_t *pos, int32_t *sel, int64_t sel_stride, int32_t *n_sel,
                      float *scratch, int64_t scratch_stride);
/* scratch floats per thread of dsa_index_select for n_ctx positions */
int64_t dsa_index_scratch_floats(int n_ctx);

/* attn_mla over positions sel[t*sel_stride + i], i < n_sel[t] (ascending,
 * each <= the token's position) instead of 0..pos[t]; same scratch as
 * attn_mla (attn_scratch_floats). */
void attn_mla_sparse(pool *p, const attn_mla_params *a, int T, const float *q, const int32_t *seq,
                     const int32_t *sel, int64_t sel_stride, const int32_t *n_sel, float *out, float *scratch,
                     int64_t scratch_stride);

#endif
