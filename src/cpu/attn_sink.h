/*
 * attn_sink.h - GQA with attention sinks (gpt-oss), CPU reference (fp32).
 *
 * Each head h has a learned logit sink[h] that takes part in the softmax but
 * has no value: p_j = exp(s_j - m) / (sum_i exp(s_i - m) + exp(sink - m)),
 * m the largest of the scores and the sink, so a head may attend to
 * "nothing". Otherwise as attn_gqa (attn.h): cache layout, window, scratch.
 */
#ifndef TD_CPU_ATTN_SINK_H
#define TD_CPU_ATTN_SINK_H

#include "cpu/attn.h"

/* q [T][n_head*head_dim] (rope applied); out [T][n_head*head_dim]; sinks [n_head] */
void attn_gqa_sink(pool *p, const attn_gqa_params *a, const float *sinks, int T, const float *q,
                   const int32_t *seq, const int32_t *pos, float *out, float *scratch, int64_t scratch_stride);

#endif
