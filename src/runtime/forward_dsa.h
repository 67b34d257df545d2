/*
 * forward_dsa.h - DeepSeek sparse attention's step of the CPU forward pass
 * (forward_dsa.c), for forward.c. The session side (cache, scratch) is in
 * engine.h.
 */
#ifndef TD_RUNTIME_FORWARD_DSA_H
#define TD_RUNTIME_FORWARD_DSA_H

#include "cpu/attn.h"
#include "runtime/engine.h"

/* After MLA has written layer l's latent cache rows for the batch: write the
 * indexer keys, select up to index_topk positions per token (or reuse the
 * previous layer's selection on a shared layer) and run MLA over them into
 * s->att. a: the MLA parameters attn_mla would get; qa [T][ldqa]: the normed
 * q_lora latent. */
void dsa_attention(tandem_session *s, int l, int T, const attn_mla_params *a, const float *qa, int64_t ldqa);

#endif
