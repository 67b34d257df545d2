/*
 * model_oss.c - config.json of gpt-oss (GptOssForCausalLM).
 *
 * GQA with biases on q/k/v/o and a learned "sink" logit per head that joins
 * every softmax (attending to nothing); layer_types alternates
 * "sliding_attention" (sliding_window positions) and "full_attention"; yarn
 * rope. Every layer is MoE: the router has a bias, picks the top-k logits and
 * softmaxes only those; the experts are stored fused and transposed as
 * transformers keeps them, gate_up_proj [E][D][2F] (gate and up interleaved
 * by column) with gate_up_proj_bias [E][2F], down_proj [E][F][D] with
 * down_proj_bias [E][D], and apply the clamped SwiGLU
 *     g = min(gate, limit), u = clamp(up, -limit, limit), act = (u + 1) g sigmoid(alpha g).
 * The checkpoints OpenAI released store those experts in MXFP4 (_blocks and
 * _scales tensors); they are not read yet (load.c names them).
 */
#include "core/err.h"
#include "model/families.h"

#include <stdlib.h>
#include <string.h>

#define TRY(x)                    \
    do {                          \
        int rc_ = (x);            \
        if (rc_)                  \
            return rc_;           \
    } while (0)

int model_parse_oss(model_desc *d, const cfg_ctx *c)
{
    double v;
    d->oss = 1;
    json_t *q = json_object_get(c->root, "quantization_config");
    json_t *qm = json_is_object(q) ? json_object_get(q, "quant_method") : NULL;
    if (json_is_string(qm) && !strcmp(json_string_value(qm), "mxfp4"))
        return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                      "%s: MXFP4 experts (quantization_config.quant_method \"mxfp4\") are not supported yet: use a "
                      "BF16 checkpoint (transformers dequantises with Mxfp4Config(dequantize=True))",
                      c->file);
    d->o_bias = d->qkv_bias; /* attention_bias covers o_proj too */
    TRY(cfg_num(c, "swiglu_alpha", 1.702, &v));
    d->swiglu_alpha = (float)v;
    TRY(cfg_num(c, "swiglu_limit", 7.0, &v));
    if (!(v > 0))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: swiglu_limit %g must be > 0", c->file, v);
    d->swiglu_limit = (float)v;
    d->route = ROUTE_SOFTMAX; /* described as such; forward_oss.c routes (softmax over the top-k logits) */
    d->norm_topk = 1;
    for (int l = 0; l < d->n_layer; l++)
        d->layer_moe[l] = 1;
    d->layer_window = calloc((size_t)d->n_layer, 1);
    if (!d->layer_window)
        return td_err(c->err, c->errlen, TANDEM_ENOMEM, "out of memory");
    json_t *lt = json_object_get(c->root, "layer_types");
    for (int l = 0; l < d->n_layer; l++) {
        const char *s = NULL;
        if (lt && !json_is_null(lt)) {
            if (!json_is_array(lt) || (int)json_array_size(lt) != d->n_layer)
                return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                              "%s: field 'layer_types' must be a list of %d strings", c->file, d->n_layer);
            s = json_string_value(json_array_get(lt, (size_t)l));
        } else {
            s = (l + 1) % 2 ? "sliding_attention" : "full_attention";
        }
        if (s && !strcmp(s, "sliding_attention"))
            d->layer_window[l] = 1;
        else if (!s || strcmp(s, "full_attention"))
            return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                          "%s: layer_types[%d] is '%s': not supported (sliding_attention or full_attention)", c->file,
                          l, s ? s : "(not a string)");
        if (d->layer_window[l] && d->sliding_window <= 0)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                          "%s: layer %d is sliding_attention but sliding_window is not set", c->file, l);
    }
    return 0;
}
