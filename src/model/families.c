/*
 * families.c - what the families added after the 2025 set need from the
 * rest of tandem, in one place: which of them the GPU path does not run yet
 * (their CPU forward is verified against transformers; the GPU kernels for
 * sparse attention, linear attention and attention sinks are not written
 * yet, so a GPU run would silently compute something else), and how they
 * describe their attention and cache.
 */
#include "model/model.h"

const char *model_gpu_unsupported(const model_desc *d)
{
    if (d->dsa)
        return "DeepSeek sparse attention";
    if (d->layer_linear)
        return "Gated DeltaNet linear attention";
    if (d->attn_gate)
        return "gated attention";
    if (d->oss)
        return "attention sinks, biased clamped-SwiGLU experts";
    return NULL;
}

const char *model_attn_name(const model_desc *d)
{
    if (d->dsa)
        return "MLA + DeepSeek sparse attention";
    if (d->layer_linear)
        return "Gated DeltaNet + gated GQA (hybrid)";
    if (d->oss)
        return "GQA + attention sinks, sliding window / full alternating";
    return d->attn == ATTN_GQA ? "GQA" : "MLA";
}

/* Per-token cache floats beyond "every layer holds a KV row": DSA's indexer
 * keys (+), linear-attention layers that hold no KV row (-). */
int64_t model_extra_cache_floats(const model_desc *d)
{
    int64_t n = 0;
    for (int l = 0; d->dsa && l < d->n_layer; l++)
        n += d->index_shared[l] ? 0 : d->index_head_dim;
    if (d->layer_linear)
        n -= (int64_t)d->n_layer_linear * 2 * d->n_kv_head * d->head_dim;
    return n;
}
