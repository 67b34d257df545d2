/*
 * families.h - config.json parsers of the families that live in their own
 * files (model_dsa.c, ...), called by config.c once the fields every family
 * shares are read. Internal to src/model/.
 */
#ifndef TD_MODEL_FAMILIES_H
#define TD_MODEL_FAMILIES_H

#include "io/cfg.h"
#include "model/model.h"

/* DeepSeek-V3.2 / GLM-5: MLA as DeepSeek-V3 plus the sparse-attention indexer. */
static inline int model_is_dsa(model_arch a)
{
    return a == ARCH_DEEPSEEK_V32 || a == ARCH_GLM_MOE_DSA;
}

/* The DSA fields (index_*, indexer_types) and mlp_layer_types, after the
 * DeepSeek-V3 fields are parsed. */
int model_parse_dsa(model_desc *d, const cfg_ctx *c);

static inline int model_is_qwen35(model_arch a)
{
    return a == ARCH_QWEN35_MOE || a == ARCH_QWEN3_NEXT;
}

/* Qwen3.5-MoE / Qwen3-Next: layer_types, the linear-attention fields, the
 * experts (every layer MoE in Qwen3.5; decoder_sparse_step and
 * mlp_only_layers in Qwen3-Next), after the GQA fields are parsed. */
int model_parse_qwen35(model_desc *d, const cfg_ctx *c);

/* A multimodal architecture whose text model tandem runs (Qwen3.5-MoE's and
 * Kimi-K2.5's ...ForConditionalGeneration): point c at config.json's
 * text_config and set d->prefix (and d->head_prefix) to the text model's
 * tensor prefixes. Others: nothing to do. */
int model_text_config(model_desc *d, cfg_ctx *c);

/* gpt-oss: layer_types (sliding / full), swiglu_alpha and swiglu_limit, biases. */
int model_parse_oss(model_desc *d, const cfg_ctx *c);

#endif
