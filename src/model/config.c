/*
 * config.c - config.json -> model_desc for every supported family.
 *
 * Field names and defaults follow the Hugging Face configuration classes
 * (transformers 5.x) and the configs published with the models, which use
 * older names (rope_scaling / rope_theta instead of rope_parameters,
 * num_experts instead of num_local_experts). Both spellings are accepted.
 * Anything that would change the maths and that we do not implement (a rope
 * type, an activation, a routing method) is an error naming the field.
 */
#include "model/model.h"
#include "core/err.h"
#include "model/families.h"
#include "io/cfg.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TRY(x)                    \
    do {                          \
        int rc_ = (x);            \
        if (rc_)                  \
            return rc_;           \
    } while (0)

static const struct {
    const char *arch, *model_type;
    model_arch id;
} archs[] = {
    { "Qwen3MoeForCausalLM", "qwen3_moe", ARCH_QWEN3_MOE },
    { "Qwen2MoeForCausalLM", "qwen2_moe", ARCH_QWEN2_MOE },
    { "MixtralForCausalLM", "mixtral", ARCH_MIXTRAL },
    { "DeepseekV2ForCausalLM", "deepseek_v2", ARCH_DEEPSEEK_V2 },
    { "DeepseekV3ForCausalLM", "deepseek_v3", ARCH_DEEPSEEK_V3 },
    { "Glm4MoeForCausalLM", "glm4_moe", ARCH_GLM4_MOE },
    { "DeepseekV32ForCausalLM", "deepseek_v32", ARCH_DEEPSEEK_V32 },
    { "GlmMoeDsaForCausalLM", "glm_moe_dsa", ARCH_GLM_MOE_DSA },
    { "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", ARCH_QWEN35_MOE },
    { "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", ARCH_QWEN35_MOE }, /* its text model (families.h) */
    { "Qwen3NextForCausalLM", "qwen3_next", ARCH_QWEN3_NEXT },
    { "KimiK25ForConditionalGeneration", "kimi_k25", ARCH_DEEPSEEK_V3 }, /* its text model (families.h) */
    { "GptOssForCausalLM", "gpt_oss", ARCH_GPT_OSS },
};

const char *model_route_name(route_kind r)
{
    switch (r) {
    case ROUTE_SOFTMAX: return "softmax top-k";
    case ROUTE_SOFTMAX_GROUP: return "softmax, group-limited top-k";
    case ROUTE_SIGMOID_GROUP: return "sigmoid + bias, group-limited top-k";
    }
    return "?";
}

/* First present integer among several spellings of one field. */
static int int_any(const cfg_ctx *c, const char *const *keys, long long def, long long *out)
{
    for (int i = 0; keys[i]; i++)
        if (cfg_has(c, keys[i]))
            return cfg_int(c, keys[i], def, out);
    *out = def;
    return 0;
}

static double yarn_mscale(double scale, double m)
{
    return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}

/* rope_parameters (v5) or rope_scaling + rope_theta (published configs). */
static int parse_rope(model_desc *d, const cfg_ctx *c, int head_dim_for_rope, double def_partial)
{
    json_t *rp = json_object_get(c->root, "rope_parameters");
    if (!json_is_object(rp))
        rp = json_object_get(c->root, "rope_scaling");
    if (rp && !json_is_null(rp) && !json_is_object(rp))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field 'rope_scaling' must be an object", c->file);
    cfg_ctx r = *c;
    r.root = json_is_object(rp) ? rp : NULL;
    json_t *empty = NULL;
    if (!r.root)
        r.root = empty = json_object();
    int rc = 0;
    const char *type = NULL;
    double theta, partial, factor = 0;
    if ((rc = cfg_num(c, "rope_theta", 10000.0, &theta)))
        goto done;
    if ((rc = cfg_num(&r, "rope_theta", theta, &theta)))
        goto done;
    if ((rc = cfg_num(c, "partial_rotary_factor", def_partial, &partial)))
        goto done;
    if ((rc = cfg_num(&r, "partial_rotary_factor", partial, &partial)))
        goto done;
    if ((rc = cfg_str(&r, "type", "default", &type)))
        goto done;
    if ((rc = cfg_str(&r, "rope_type", type, &type)))
        goto done;
    if (!(partial > 0 && partial <= 1)) {
        rc = td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: partial_rotary_factor %g is not in (0, 1]", c->file,
                    partial);
        goto done;
    }
    d->rope_theta = theta;
    d->rope_dim = (int)(head_dim_for_rope * partial);
    d->rope_dim &= ~1;
    d->rope_scale = 1.0f;
    if (!strcmp(type, "default")) {
        d->rope_yarn = 0;
    } else if (!strcmp(type, "yarn")) {
        long long orig;
        double mscale, mscale_all, att;
        d->rope_yarn = 1;
        if ((rc = cfg_num(&r, "factor", 0, &factor)))
            goto done;
        if ((rc = cfg_int(c, "original_max_position_embeddings", d->max_ctx, &orig)) ||
            (rc = cfg_int(&r, "original_max_position_embeddings", orig, &orig)))
            goto done;
        if (orig <= 0) {
            rc = td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: original_max_position_embeddings must be > 0",
                        c->file);
            goto done;
        }
        if (factor == 0)
            factor = (double)d->max_ctx / (double)orig;
        if ((rc = cfg_num(&r, "mscale", 0, &mscale)) || (rc = cfg_num(&r, "mscale_all_dim", 0, &mscale_all)) ||
            (rc = cfg_num(&r, "beta_fast", 32, &d->yarn_beta_fast)) ||
            (rc = cfg_num(&r, "beta_slow", 1, &d->yarn_beta_slow)) ||
            (rc = cfg_bool(&r, "truncate", 1, &d->yarn_truncate)))
            goto done;
        if (d->yarn_beta_fast == 0)
            d->yarn_beta_fast = 32;
        if (d->yarn_beta_slow == 0)
            d->yarn_beta_slow = 1;
        d->yarn_factor = factor;
        d->yarn_orig_ctx = (int)orig;
        if (cfg_has(&r, "attention_factor")) {
            if ((rc = cfg_num(&r, "attention_factor", 1, &att)))
                goto done;
        } else if (mscale != 0 && mscale_all != 0) {
            att = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all);
        } else {
            att = yarn_mscale(factor, 1);
        }
        d->rope_scale = (float)att;
        /* MLA models also scale the softmax by mscale(all_dim)^2 */
        if (d->attn == ATTN_MLA && mscale_all != 0) {
            double m = yarn_mscale(factor, mscale_all);
            d->attn_scale = (float)(d->attn_scale * m * m);
        }
    } else {
        rc = td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                    "%s: rope type '%s' is not supported yet (supported: default, yarn)", c->file, type);
    }
done:
    json_decref(empty);
    return rc;
}

/* Read mlp_only_layers (a list of layer indices) into a mask. */
static int parse_layer_list(const cfg_ctx *c, const char *key, uint8_t *mask, int n_layer)
{
    json_t *v = json_object_get(c->root, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_array(v))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' must be a list of layer indices", c->file,
                      key);
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= n_layer)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s'[%zu] is not a layer index below %d",
                          c->file, key, i, n_layer);
        mask[json_integer_value(e)] = 1;
    }
    return 0;
}

static int token_id(const cfg_ctx *c, const char *key, int *out)
{
    json_t *v = json_object_get(c->root, key);
    *out = -1;
    if (json_is_integer(v))
        *out = (int)json_integer_value(v);
    else if (json_is_array(v) && json_array_size(v) > 0 && json_is_integer(json_array_get(v, 0)))
        *out = (int)json_integer_value(json_array_get(v, 0));
    return 0;
}

/* ---- compressed-tensors ------------------------------------------------- */

/* A field of a compressed-tensors weights scheme that must have one value. */
static int ct_need(const cfg_ctx *c, const char *where, json_t *obj, const char *key, json_t *want)
{
    json_t *v = json_object_get(obj, key);
    int ok = v && json_equal(v, want);
    if (!ok) {
        char *have = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
        char *w = json_dumps(want, JSON_ENCODE_ANY | JSON_COMPACT);
        td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
               "%s: quantization_config %s.%s is %s: not supported yet (compressed-tensors: only %s, as in "
               "pack-quantized INT4 group-32 symmetric weights)",
               c->file, where, key, have ? have : "missing", w ? w : "?");
        free(have);
        free(w);
    }
    json_decref(want);
    return ok ? 0 : TANDEM_EUNSUPPORTED;
}

/* quant_method "compressed-tensors": only the scheme Kimi-K2-Thinking / K2.5
 * release their routed experts in, weight-only INT4 in format
 * "pack-quantized", symmetric, one scale per 32 columns (W = q * scale). The
 * config names the quantised layers by `targets` and an `ignore` list of
 * names and regular expressions; instead of evaluating those, the loader
 * takes each routed expert as INT4 where the checkpoint holds its
 * weight_packed, and refuses any other quantised tensor by name. */
static int parse_compressed_tensors(model_desc *d, const cfg_ctx *c, json_t *q)
{
    cfg_ctx qc = *c;
    qc.root = q;
    const char *fmt;
    TRY(cfg_str(&qc, "format", "", &fmt));
    if (strcmp(fmt, "pack-quantized"))
        return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                      "%s: quantization_config.format '%s' is not supported yet (compressed-tensors: "
                      "pack-quantized only)",
                      c->file, fmt);
    json_t *kv = json_object_get(q, "kv_cache_scheme");
    if (kv && !json_is_null(kv))
        return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                      "%s: quantization_config.kv_cache_scheme is not supported yet", c->file);
    json_t *groups = json_object_get(q, "config_groups");
    if (!json_is_object(groups) || json_object_size(groups) == 0)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: quantization_config.config_groups must be a non-empty object", c->file);
    const char *name;
    json_t *g;
    json_object_foreach(groups, name, g) {
        char where[128];
        snprintf(where, sizeof where, "config_groups.%.64s", name);
        if (!json_is_object(g))
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: quantization_config %s must be an object", c->file,
                          where);
        json_t *gf = json_object_get(g, "format");
        if (gf && !json_is_null(gf))
            TRY(ct_need(c, where, g, "format", json_string("pack-quantized")));
        static const char *const acts[] = { "input_activations", "output_activations" };
        for (int i = 0; i < 2; i++) {
            json_t *a = json_object_get(g, acts[i]);
            if (a && !json_is_null(a))
                return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                              "%s: quantization_config %s.%s: quantised activations are not supported yet "
                              "(weight-only INT4 only)",
                              c->file, where, acts[i]);
        }
        json_t *w = json_object_get(g, "weights");
        if (!json_is_object(w))
            return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                          "%s: quantization_config %s.weights is missing: not supported yet", c->file, where);
        snprintf(where, sizeof where, "config_groups.%.64s.weights", name);
        TRY(ct_need(c, where, w, "type", json_string("int")));
        TRY(ct_need(c, where, w, "num_bits", json_integer(4)));
        TRY(ct_need(c, where, w, "strategy", json_string("group")));
        TRY(ct_need(c, where, w, "group_size", json_integer(MODEL_INT4_GROUP)));
        TRY(ct_need(c, where, w, "symmetric", json_true()));
        /* activation reordering stores a permutation (weight_g_idx) we do not apply */
        json_t *ao = json_object_get(w, "actorder");
        if (ao && !json_is_null(ao) && !json_is_false(ao))
            TRY(ct_need(c, where, w, "actorder", json_null()));
        json_t *dyn = json_object_get(w, "dynamic");
        if (dyn && !json_is_false(dyn))
            TRY(ct_need(c, where, w, "dynamic", json_false()));
    }
    json_t *ign = json_object_get(q, "ignore");
    if (ign && !json_is_null(ign) && !json_is_array(ign))
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: quantization_config.ignore must be a list", c->file);
    d->expert_int4 = 1;
    return 0;
}

static int parse(model_desc *d, const cfg_ctx *c)
{
    long long v;
    static const char *const k_experts[] = { "num_local_experts", "num_experts", "n_routed_experts", NULL };
    static const char *const k_ff_expert[] = { "moe_intermediate_size", "intermediate_size", NULL };
    int is_ds = d->arch == ARCH_DEEPSEEK_V2 || d->arch == ARCH_DEEPSEEK_V3 || model_is_dsa(d->arch);

    TRY(cfg_need_int(c, "num_hidden_layers", &v));
    TRY(cfg_check_range(c, "num_hidden_layers", v, 1, 1024));
    d->n_layer = (int)v;
    TRY(cfg_need_int(c, "hidden_size", &v));
    TRY(cfg_check_range(c, "hidden_size", v, 1, 1 << 20));
    d->d_model = (int)v;
    TRY(cfg_need_int(c, "vocab_size", &v));
    TRY(cfg_check_range(c, "vocab_size", v, 1, 1 << 24));
    d->n_vocab = (int)v;
    TRY(cfg_int(c, "max_position_embeddings", 4096, &v));
    TRY(cfg_check_range(c, "max_position_embeddings", v, 1, 1ll << 30));
    d->max_ctx = (int)v;
    double eps;
    TRY(cfg_num(c, "rms_norm_eps", 1e-6, &eps));
    d->rms_eps = (float)eps;
    TRY(cfg_bool(c, "tie_word_embeddings", 0, &d->tie_embed));
    TRY(cfg_need_int(c, "num_attention_heads", &v));
    TRY(cfg_check_range(c, "num_attention_heads", v, 1, 4096));
    d->n_head = (int)v;
    TRY(cfg_int(c, "num_key_value_heads", d->n_head, &v));
    TRY(cfg_check_range(c, "num_key_value_heads", v, 1, d->n_head));
    d->n_kv_head = (int)v;
    if (d->n_head % d->n_kv_head)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d", c->file, d->n_head,
                      d->n_kv_head);
    const char *act;
    TRY(cfg_str(c, "hidden_act", "silu", &act));
    if (strcmp(act, "silu") && strcmp(act, "swish"))
        return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                      "%s: hidden_act '%s' is not supported yet (supported: silu)", c->file, act);
    TRY(cfg_int(c, "intermediate_size", 0, &v));
    TRY(cfg_check_range(c, "intermediate_size", v, 0, 1 << 22));
    d->d_ff = (int)v;
    TRY(cfg_bool(c, "mlp_bias", 0, &d->mlp_bias));
    token_id(c, "bos_token_id", &d->bos_id);
    token_id(c, "eos_token_id", &d->eos_id);

    /* ---- attention ---- */
    if (is_ds) {
        d->attn = ATTN_MLA;
        TRY(cfg_int(c, "q_lora_rank", 0, &v));
        TRY(cfg_check_range(c, "q_lora_rank", v, 0, 1 << 16));
        d->q_lora_rank = (int)v;
        TRY(cfg_need_int(c, "kv_lora_rank", &v));
        TRY(cfg_check_range(c, "kv_lora_rank", v, 1, 1 << 16));
        d->kv_lora_rank = (int)v;
        TRY(cfg_need_int(c, "qk_nope_head_dim", &v));
        TRY(cfg_check_range(c, "qk_nope_head_dim", v, 0, 4096));
        d->qk_nope_dim = (int)v;
        TRY(cfg_need_int(c, "qk_rope_head_dim", &v));
        TRY(cfg_check_range(c, "qk_rope_head_dim", v, 2, 4096));
        d->qk_rope_dim = (int)v;
        TRY(cfg_need_int(c, "v_head_dim", &v));
        TRY(cfg_check_range(c, "v_head_dim", v, 1, 4096));
        d->v_head_dim = (int)v;
        int bias;
        TRY(cfg_bool(c, "attention_bias", 0, &bias));
        if (bias)
            return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                          "%s: attention_bias=true with MLA attention is not supported yet", c->file);
        d->attn_scale = (float)(1.0 / sqrt((double)(d->qk_nope_dim + d->qk_rope_dim)));
        int interleave = 1;
        if (d->arch == ARCH_DEEPSEEK_V3)
            TRY(cfg_bool(c, "rope_interleave", 1, &interleave));
        d->rope = interleave ? ROPE_PAIRS : ROPE_HALF;
        TRY(parse_rope(d, c, d->qk_rope_dim, 1.0));
        if (d->rope_dim != d->qk_rope_dim)
            return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                          "%s: partial rotary on MLA's qk_rope_head_dim is not supported", c->file);
    } else {
        d->attn = ATTN_GQA;
        TRY(cfg_int(c, "head_dim", d->d_model / d->n_head, &v));
        TRY(cfg_check_range(c, "head_dim", v, 2, 4096));
        d->head_dim = (int)v;
        d->attn_scale = (float)(1.0 / sqrt((double)d->head_dim));
        d->rope = ROPE_HALF;
        if (d->arch == ARCH_QWEN2_MOE) {
            TRY(cfg_bool(c, "qkv_bias", 1, &d->qkv_bias));
        } else if (d->arch != ARCH_MIXTRAL) {
            TRY(cfg_bool(c, "attention_bias", 0, &d->qkv_bias));
            d->o_bias = d->arch == ARCH_QWEN3_MOE ? d->qkv_bias : 0;
        }
        d->qk_norm = d->arch == ARCH_QWEN3_MOE || model_is_qwen35(d->arch);
        if (d->arch == ARCH_GLM4_MOE)
            TRY(cfg_bool(c, "use_qk_norm", 0, &d->qk_norm));
        TRY(parse_rope(d, c, d->head_dim, d->arch == ARCH_GLM4_MOE ? 0.5 : model_is_qwen35(d->arch) ? 0.25 : 1.0));
        if (d->rope_dim < 2)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: rotary dimension %d is too small", c->file,
                          d->rope_dim);
        if (d->arch == ARCH_QWEN2_MOE) {
            int sw;
            TRY(cfg_bool(c, "use_sliding_window", 0, &sw));
            if (sw)
                return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                              "%s: use_sliding_window=true is not supported yet", c->file);
        } else if (d->arch != ARCH_GLM4_MOE) {
            TRY(cfg_int(c, "sliding_window", 0, &v));
            TRY(cfg_check_range(c, "sliding_window", v, 0, 1ll << 30));
            d->sliding_window = (int)v;
        }
    }

    /* ---- experts and routing ---- */
    TRY(int_any(c, k_experts, 0, &v));
    TRY(cfg_check_range(c, "num_experts", v, 1, 1 << 16));
    d->n_expert = (int)v;
    TRY(cfg_need_int(c, "num_experts_per_tok", &v));
    TRY(cfg_check_range(c, "num_experts_per_tok", v, 1, d->n_expert));
    d->n_expert_used = (int)v;
    TRY(int_any(c, k_ff_expert, 0, &v));
    TRY(cfg_check_range(c, "moe_intermediate_size", v, 1, 1 << 22));
    d->d_ff_expert = (int)v;
    double rsf;
    TRY(cfg_num(c, "routed_scaling_factor", 1.0, &rsf));
    d->route_scale = (float)rsf;
    d->n_group = d->topk_group = 1;
    d->layer_moe = calloc((size_t)d->n_layer, 1);
    if (!d->layer_moe)
        return td_err(c->err, c->errlen, TANDEM_ENOMEM, "out of memory");

    switch (d->arch) {
    case ARCH_QWEN3_MOE:
    case ARCH_QWEN2_MOE: {
        long long step;
        uint8_t *dense = calloc((size_t)d->n_layer, 1);
        if (!dense)
            return td_err(c->err, c->errlen, TANDEM_ENOMEM, "out of memory");
        int rc = cfg_int(c, "decoder_sparse_step", 1, &step);
        if (!rc)
            rc = cfg_check_range(c, "decoder_sparse_step", step, 1, 1024);
        if (!rc)
            rc = parse_layer_list(c, "mlp_only_layers", dense, d->n_layer);
        for (int l = 0; !rc && l < d->n_layer; l++)
            d->layer_moe[l] = !dense[l] && (l + 1) % step == 0;
        free(dense);
        TRY(rc);
        d->route = ROUTE_SOFTMAX;
        TRY(cfg_bool(c, "norm_topk_prob", 0, &d->norm_topk));
        if (d->arch == ARCH_QWEN2_MOE) {
            TRY(cfg_int(c, "shared_expert_intermediate_size", 0, &v));
            TRY(cfg_check_range(c, "shared_expert_intermediate_size", v, 0, 1 << 22));
            d->d_ff_shared = (int)v;
            d->shared_gate = d->d_ff_shared > 0;
        }
        break;
    }
    case ARCH_QWEN35_MOE:
    case ARCH_QWEN3_NEXT:
        TRY(model_parse_qwen35(d, c));
        break;
    case ARCH_GPT_OSS:
        TRY(model_parse_oss(d, c));
        break;
    case ARCH_MIXTRAL:
        for (int l = 0; l < d->n_layer; l++)
            d->layer_moe[l] = 1;
        d->route = ROUTE_SOFTMAX;
        d->norm_topk = 1;
        break;
    case ARCH_DEEPSEEK_V2:
    case ARCH_DEEPSEEK_V3:
    case ARCH_DEEPSEEK_V32:
    case ARCH_GLM_MOE_DSA:
    case ARCH_GLM4_MOE: {
        long long first_dense, step = 1, n_shared;
        TRY(cfg_int(c, "first_k_dense_replace", d->arch == ARCH_DEEPSEEK_V2 ? 0 : (d->arch == ARCH_GLM4_MOE ? 1 : 3),
                    &first_dense));
        TRY(cfg_check_range(c, "first_k_dense_replace", first_dense, 0, d->n_layer));
        if (d->arch == ARCH_DEEPSEEK_V2) {
            TRY(cfg_int(c, "moe_layer_freq", 1, &step));
            TRY(cfg_check_range(c, "moe_layer_freq", step, 1, 1024));
        }
        for (int l = 0; l < d->n_layer; l++)
            d->layer_moe[l] = l >= first_dense && l % step == 0;
        TRY(cfg_int(c, "n_shared_experts", 0, &n_shared));
        TRY(cfg_check_range(c, "n_shared_experts", n_shared, 0, 1024));
        d->d_ff_shared = (int)(n_shared * d->d_ff_expert);
        TRY(cfg_int(c, "n_group", 1, &v));
        TRY(cfg_check_range(c, "n_group", v, 1, d->n_expert < 1024 ? d->n_expert : 1024));
        d->n_group = (int)v;
        TRY(cfg_int(c, "topk_group", 1, &v));
        TRY(cfg_check_range(c, "topk_group", v, 1, d->n_group));
        d->topk_group = (int)v;
        if (d->n_expert % d->n_group)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: %d experts do not split into n_group=%d groups",
                          c->file, d->n_expert, d->n_group);
        if (d->arch == ARCH_DEEPSEEK_V2) {
            const char *m, *sf;
            TRY(cfg_str(c, "topk_method", "greedy", &m));
            TRY(cfg_str(c, "scoring_func", "softmax", &sf));
            if (strcmp(sf, "softmax"))
                return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                              "%s: scoring_func '%s' is not supported for DeepSeek-V2 (softmax only)", c->file, sf);
            if (!strcmp(m, "greedy"))
                d->route = ROUTE_SOFTMAX;
            else if (!strcmp(m, "group_limited_greedy"))
                d->route = ROUTE_SOFTMAX_GROUP;
            else
                return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                              "%s: topk_method '%s' is not supported yet (greedy, group_limited_greedy)", c->file, m);
            d->norm_topk = 0; /* transformers' DeepSeek-V2 router never renormalises */
        } else {
            const char *sf;
            TRY(cfg_str(c, "scoring_func", "sigmoid", &sf));
            if (strcmp(sf, "sigmoid"))
                return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                              "%s: scoring_func '%s' is not supported (sigmoid only for this family)", c->file, sf);
            d->route = ROUTE_SIGMOID_GROUP;
            d->route_bias = 1;
            TRY(cfg_bool(c, "norm_topk_prob", 1, &d->norm_topk));
        }
        if (d->route != ROUTE_SOFTMAX && d->topk_group * (d->n_expert / d->n_group) < d->n_expert_used)
            return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                          "%s: topk_group=%d groups of %d experts cannot supply num_experts_per_tok=%d", c->file,
                          d->topk_group, d->n_expert / d->n_group, d->n_expert_used);
        break;
    }
    }
    if (model_is_dsa(d->arch))
        TRY(model_parse_dsa(d, c));
    for (int l = 0; l < d->n_layer; l++)
        d->n_layer_moe += d->layer_moe[l];
    if (d->n_layer_moe < d->n_layer && d->d_ff <= 0)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: dense layers need intermediate_size > 0", c->file);

    /* ---- quantised checkpoints: FP8 with block scales, or INT4 experts ---- */
    json_t *q = json_object_get(c->root, "quantization_config");
    if (json_is_object(q)) {
        cfg_ctx qc = *c;
        qc.root = q;
        const char *method, *fmt;
        TRY(cfg_str(&qc, "quant_method", "", &method));
        if (!strcmp(method, "compressed-tensors"))
            return parse_compressed_tensors(d, c, q);
        TRY(cfg_str(&qc, "fmt", "e4m3", &fmt));
        if (strcmp(method, "fp8") || strcmp(fmt, "e4m3"))
            return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                          "%s: quantization_config quant_method '%s' fmt '%s' is not supported yet (fp8 e4m3 only)",
                          c->file, method, fmt);
        d->fp8 = 1;
        d->fp8_block[0] = d->fp8_block[1] = 128;
        json_t *bs = json_object_get(q, "weight_block_size");
        if (bs && !json_is_null(bs)) {
            if (!json_is_array(bs) || json_array_size(bs) != 2 || !json_is_integer(json_array_get(bs, 0)) ||
                !json_is_integer(json_array_get(bs, 1)) || json_integer_value(json_array_get(bs, 0)) < 1 ||
                json_integer_value(json_array_get(bs, 1)) < 1 || json_integer_value(json_array_get(bs, 0)) > 65536 ||
                json_integer_value(json_array_get(bs, 1)) > 65536)
                return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                              "%s: quantization_config.weight_block_size must be [rows, cols]", c->file);
            d->fp8_block[0] = (int)json_integer_value(json_array_get(bs, 0));
            d->fp8_block[1] = (int)json_integer_value(json_array_get(bs, 1));
        }
    }
    return 0;
}

int model_load_config(model_desc *d, const char *path, char *err, size_t errlen)
{
    memset(d, 0, sizeof *d);
    json_t *root;
    int rc = cfg_load_file(&root, path, err, errlen);
    if (rc)
        return rc;
    cfg_ctx c = { .file = path, .root = root, .err = err, .errlen = errlen };
    const char *arch = NULL, *mt = NULL;
    json_t *a = json_object_get(root, "architectures");
    if (json_is_array(a) && json_array_size(a) > 0 && json_is_string(json_array_get(a, 0)))
        arch = json_string_value(json_array_get(a, 0));
    cfg_str(&c, "model_type", NULL, &mt);
    int found = 0;
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if ((arch && !strcmp(arch, archs[i].arch)) || (!arch && mt && !strcmp(mt, archs[i].model_type))) {
            d->arch = archs[i].id;
            snprintf(d->arch_name, sizeof d->arch_name, "%s", archs[i].arch);
            found = 1;
        }
    if (found && (rc = model_text_config(d, &c)) != 0) {
        /* a multimodal checkpoint whose text_config is missing: model_text_config said so */
    } else if (!found) {
        rc = td_err(err, errlen, TANDEM_EUNSUPPORTED,
                    "%s: architecture '%s' (model_type '%s') is not supported; supported: Qwen3MoeForCausalLM, "
                    "Qwen2MoeForCausalLM, MixtralForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM "
                    "(also Kimi-K2), Glm4MoeForCausalLM, DeepseekV32ForCausalLM, GlmMoeDsaForCausalLM, "
                    "Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration (its text model), Qwen3NextForCausalLM, "
                    "KimiK25ForConditionalGeneration (its text model), GptOssForCausalLM",
                    path, arch ? arch : "?", mt ? mt : "?");
    } else {
        rc = parse(d, &c);
    }
    json_decref(root);
    if (rc)
        model_desc_free(d);
    return rc;
}

void model_desc_free(model_desc *d)
{
    if (!d)
        return;
    free(d->layer_moe);
    d->layer_moe = NULL;
    free(d->index_shared);
    d->index_shared = NULL;
    free(d->layer_linear);
    d->layer_linear = NULL;
    free(d->layer_window);
    d->layer_window = NULL;
}
