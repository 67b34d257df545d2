/*
 * model_qwen35.c - config.json of the hybrid linear-attention families:
 * Qwen3.5-MoE (Qwen3_5MoeForCausalLM) and Qwen3-Next (Qwen3NextForCausalLM).
 *
 * layer_types mixes "full_attention" layers (GQA with q/k norm, partial
 * rotary, and an output gate: q_proj yields [q | gate] per head and the
 * attention output is multiplied by sigmoid(gate)) with "linear_attention"
 * layers, a Gated DeltaNet (transformers' Qwen3_5MoeGatedDeltaNet):
 *   in_proj_qkv [2*Hk*dk + Hv*dv][D], in_proj_z [Hv*dv][D], in_proj_b/a [Hv][D]
 *   (Qwen3-Next: in_proj_qkvz and in_proj_ba, grouped per key head),
 *   conv1d [2*Hk*dk + Hv*dv][1][K] depthwise causal, dt_bias and A_log [Hv],
 *   norm.weight [dv] (gated RMSNorm), out_proj [D][Hv*dv].
 * Every RMSNorm of the residual stream and q/k norm is zero-centred (the
 * scale is 1 + w); the DeltaNet's gated norm is not. Routing is softmax top-k
 * plus a shared expert with a sigmoid gate, as Qwen2-MoE.
 */
#include "core/err.h"
#include "core/log.h"
#include "model/families.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(x)                    \
    do {                          \
        int rc_ = (x);            \
        if (rc_)                  \
            return rc_;           \
    } while (0)

static int need_range(const cfg_ctx *c, const char *key, long long def, long long lo, long long hi, int *out)
{
    long long v;
    TRY(cfg_int(c, key, def, &v));
    TRY(cfg_check_range(c, key, v, lo, hi));
    *out = (int)v;
    return 0;
}

int model_parse_qwen35(model_desc *d, const cfg_ctx *c)
{
    int next = d->arch == ARCH_QWEN3_NEXT;
    d->attn_gate = 1;
    d->norm_offset = 1;
    d->lin_fused = next;
    if (d->qkv_bias)
        return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                      "%s: attention_bias=true is not supported yet for this family", c->file);
    TRY(need_range(c, "linear_conv_kernel_dim", 4, 1, 64, &d->lin_conv));
    TRY(need_range(c, "linear_key_head_dim", 128, 1, 4096, &d->lin_k_dim));
    TRY(need_range(c, "linear_value_head_dim", 128, 1, 4096, &d->lin_v_dim));
    TRY(need_range(c, "linear_num_key_heads", 16, 1, 4096, &d->lin_k_heads));
    TRY(need_range(c, "linear_num_value_heads", 32, 1, 4096, &d->lin_v_heads));
    if (d->lin_v_heads % d->lin_k_heads)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: linear_num_value_heads %d is not a multiple of linear_num_key_heads %d", c->file,
                      d->lin_v_heads, d->lin_k_heads);

    /* layer_types, else every full_attention_interval-th layer is full attention */
    d->layer_linear = calloc((size_t)d->n_layer, 1);
    if (!d->layer_linear)
        return td_err(c->err, c->errlen, TANDEM_ENOMEM, "out of memory");
    json_t *lt = json_object_get(c->root, "layer_types");
    if (lt && !json_is_null(lt)) {
        if (!json_is_array(lt) || (int)json_array_size(lt) != d->n_layer)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field 'layer_types' must be a list of %d strings",
                          c->file, d->n_layer);
        for (int l = 0; l < d->n_layer; l++) {
            const char *s = json_string_value(json_array_get(lt, (size_t)l));
            if (s && !strcmp(s, "linear_attention"))
                d->layer_linear[l] = 1;
            else if (!s || strcmp(s, "full_attention"))
                return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                              "%s: layer_types[%d] is '%s': not supported (linear_attention or full_attention)",
                              c->file, l, s ? s : "(not a string)");
        }
    } else {
        int every;
        TRY(need_range(c, "full_attention_interval", 4, 1, 1024, &every));
        for (int l = 0; l < d->n_layer; l++)
            d->layer_linear[l] = (l + 1) % every != 0;
    }
    for (int l = 0; l < d->n_layer; l++)
        d->n_layer_linear += d->layer_linear[l];

    /* experts: softmax top-k and a gated shared expert */
    d->route = ROUTE_SOFTMAX;
    TRY(need_range(c, "shared_expert_intermediate_size", 0, 0, 1 << 22, &d->d_ff_shared));
    d->shared_gate = d->d_ff_shared > 0;
    if (!next) { /* Qwen3_5MoeTopKRouter always renormalises; every layer is MoE */
        d->norm_topk = 1;
        for (int l = 0; l < d->n_layer; l++)
            d->layer_moe[l] = 1;
        return 0;
    }
    TRY(cfg_bool(c, "norm_topk_prob", 1, &d->norm_topk));
    int step;
    TRY(need_range(c, "decoder_sparse_step", 1, 1, 1024, &step));
    for (int l = 0; l < d->n_layer; l++)
        d->layer_moe[l] = (l + 1) % step == 0;
    json_t *v = json_object_get(c->root, "mlp_only_layers");
    if (v && !json_is_null(v)) {
        size_t i;
        json_t *e;
        if (!json_is_array(v))
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field 'mlp_only_layers' must be a list", c->file);
        json_array_foreach(v, i, e) {
            if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= d->n_layer)
                return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                              "%s: field 'mlp_only_layers'[%zu] is not a layer index below %d", c->file, i,
                              d->n_layer);
            d->layer_moe[json_integer_value(e)] = 0;
        }
    }
    return 0;
}

int model_text_config(model_desc *d, cfg_ctx *c)
{
    int kimi = !strcmp(d->arch_name, "KimiK25ForConditionalGeneration");
    if (!kimi && strcmp(d->arch_name, "Qwen3_5MoeForConditionalGeneration"))
        return 0;
    json_t *t = json_object_get(c->root, "text_config");
    if (!json_is_object(t))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: %s needs a 'text_config' object", c->file,
                      d->arch_name);
    if (kimi) {
        /* Kimi-K2.5 wraps a DeepSeek-V3 (Kimi-K2) text model: language_model.model.* and
         * language_model.lm_head.weight; the quantisation and tying may be stated at the top
         * level only, and hold for the text model too */
        static const char *const up[] = {"quantization_config", "tie_word_embeddings"};
        for (size_t i = 0; i < sizeof up / sizeof up[0]; i++) {
            json_t *v = json_object_get(c->root, up[i]);
            if (v && !json_object_get(t, up[i]) && json_object_set(t, up[i], v))
                return td_err(c->err, c->errlen, TANDEM_ENOMEM, "out of memory");
        }
        snprintf(d->prefix, sizeof d->prefix, "language_model.model.");
        snprintf(d->head_prefix, sizeof d->head_prefix, "language_model.");
        td_log(TD_LOG_INFO, "%s: Kimi-K2.5: the text model (DeepSeek-V3 layout) is loaded; the vision tower "
               "is out of scope (requests with images are refused)", c->file);
    } else {
        snprintf(d->prefix, sizeof d->prefix, "model.language_model.");
    }
    c->root = t; /* the vision tower is not loaded: tandem runs the text model */
    return 0;
}
