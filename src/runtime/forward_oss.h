/*
 * forward_oss.h - gpt-oss's attention and MoE in the CPU forward pass
 * (forward_oss.c), for forward.c and session.c.
 */
#ifndef TD_RUNTIME_FORWARD_OSS_H
#define TD_RUNTIME_FORWARD_OSS_H

#include "runtime/engine.h"

/* the experts' scratch in the session (NULL for other families) */
int oss_session_create(tandem_session *s, char *err, size_t errlen);
void oss_session_free(tandem_session *s);
/* s->y = layer l's attention (biases, sinks, the layer's window) of s->h, through the KV cache */
void oss_attention(tandem_session *s, int l, int T);
/* s->y = layer l's MoE of s->h: biased router, softmax over the top-k logits, clamped-SwiGLU experts */
void oss_moe(tandem_session *s, int l, int T);

#endif
