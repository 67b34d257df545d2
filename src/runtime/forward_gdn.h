/*
 * forward_gdn.h - the steps of Qwen3.5-MoE / Qwen3-Next layers in the CPU
 * forward pass (forward_gdn.c), for forward.c. The session side is in
 * engine.h.
 */
#ifndef TD_RUNTIME_FORWARD_GDN_H
#define TD_RUNTIME_FORWARD_GDN_H

#include "runtime/engine.h"

/* Before a batch touches any state (after forward.c's validation): refuse a
 * sequence whose linear-attention state cannot continue at the batch's
 * first position (a rewind to a shorter non-empty length); then restart the
 * state of every sequence whose batch begins at position 0. */
int gdn_begin(tandem_session *s, const tandem_batch *b, char *err, size_t errlen);
/* s->y = layer l's token mixer of s->h: the Gated DeltaNet on a linear layer,
 * the gated full attention (KV cache) otherwise. */
void gdn_linear_attention(tandem_session *s, int l, int T);
void gdn_gated_attention(tandem_session *s, int l, int T);

#endif
