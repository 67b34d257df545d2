/*
 * model_dsa.c - config.json of the DeepSeek sparse attention families:
 * DeepSeek-V3.2 (DeepseekV32ForCausalLM) and GLM-5 (GlmMoeDsaForCausalLM).
 *
 * Both are DeepSeek-V3 (MLA with q_lora, sigmoid group routing, shared
 * experts) plus, per layer, a lightning indexer (transformers'
 * DeepseekV32Indexer): wq_b [index_n_heads*index_head_dim][q_lora_rank],
 * wk [index_head_dim][hidden], a LayerNorm k_norm (weight and bias, eps
 * 1e-6), weights_proj [index_n_heads][hidden]. Rope covers the first
 * qk_rope_head_dim dims of the indexer's head, half-split in DeepSeek-V3.2
 * and interleaved in GLM-5. GLM-5 may mark layers "shared" (indexer_types):
 * they have no indexer and reuse the previous layer's selection.
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

/* A list of n_layer strings; vals[i] matching names[k] stores k. */
static int str_list(const cfg_ctx *c, const char *key, const char *const *names, int n_names, uint8_t *vals,
                    int n_layer, int *present)
{
    json_t *v = json_object_get(c->root, key);
    *present = 0;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_array(v) || (int)json_array_size(v) != n_layer)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT, "%s: field '%s' must be a list of %d strings", c->file, key,
                      n_layer);
    for (int l = 0; l < n_layer; l++) {
        const char *s = json_string_value(json_array_get(v, (size_t)l));
        int k = 0;
        while (s && k < n_names && strcmp(s, names[k]))
            k++;
        if (!s || k == n_names)
            return td_err(c->err, c->errlen, TANDEM_EUNSUPPORTED,
                          "%s: field '%s'[%d] is '%s': not supported (expected %s%s%s)", c->file, key, l,
                          s ? s : "(not a string)", names[0], n_names > 1 ? " or " : "", n_names > 1 ? names[1] : "");
        vals[l] = (uint8_t)k;
    }
    *present = 1;
    return 0;
}

int model_parse_dsa(model_desc *d, const cfg_ctx *c)
{
    long long v;
    int present;
    d->dsa = 1;
    d->index_rope_pairs = d->arch == ARCH_GLM_MOE_DSA;
    if (d->q_lora_rank <= 0)
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: q_lora_rank must be > 0: the sparse-attention indexer reads the q_lora latent", c->file);
    TRY(cfg_int(c, "index_n_heads", d->arch == ARCH_GLM_MOE_DSA ? 32 : 64, &v));
    TRY(cfg_check_range(c, "index_n_heads", v, 1, 4096));
    d->index_n_heads = (int)v;
    TRY(cfg_int(c, "index_head_dim", 128, &v));
    TRY(cfg_check_range(c, "index_head_dim", v, d->qk_rope_dim, 4096));
    d->index_head_dim = (int)v;
    TRY(cfg_int(c, "index_topk", 2048, &v));
    TRY(cfg_check_range(c, "index_topk", v, 1, 1 << 24));
    d->index_topk = (int)v;

    /* mlp_layer_types overrides first_k_dense_replace (transformers 5) */
    static const char *const mlp_names[] = { "dense", "sparse" };
    TRY(str_list(c, "mlp_layer_types", mlp_names, 2, d->layer_moe, d->n_layer, &present));
    static const char *const attn_names[] = { "indexed_attention" };
    uint8_t *tmp = calloc((size_t)d->n_layer, 1);
    d->index_shared = calloc((size_t)d->n_layer, 1);
    if (!tmp || !d->index_shared) {
        free(tmp);
        return td_err(c->err, c->errlen, TANDEM_ENOMEM, "out of memory");
    }
    int rc = str_list(c, "layer_types", attn_names, 1, tmp, d->n_layer, &present);
    free(tmp);
    TRY(rc);
    if (d->arch != ARCH_GLM_MOE_DSA)
        return 0;
    /* GLM-5: indexer_types, else index_topk_pattern ("FSS..."), else
     * index_topk_freq / index_skip_topk_offset, as GlmMoeDsaConfig derives them */
    static const char *const ix_names[] = { "full", "shared" };
    TRY(str_list(c, "indexer_types", ix_names, 2, d->index_shared, d->n_layer, &present));
    if (!present) {
        json_t *pat = json_object_get(c->root, "index_topk_pattern");
        if (json_is_string(pat)) {
            const char *s = json_string_value(pat);
            if ((int)strlen(s) != d->n_layer)
                return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                              "%s: index_topk_pattern has %zu letters for %d layers", c->file, strlen(s), d->n_layer);
            for (int l = 0; l < d->n_layer; l++) {
                if (s[l] != 'F' && s[l] != 'S')
                    return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                                  "%s: index_topk_pattern[%d] is '%c', expected F or S", c->file, l, s[l]);
                d->index_shared[l] = s[l] == 'S';
            }
        } else if (pat && !json_is_null(pat)) {
            TRY(str_list(c, "index_topk_pattern", ix_names, 2, d->index_shared, d->n_layer, &present));
        } else {
            long long freq, off;
            TRY(cfg_int(c, "index_topk_freq", 1, &freq));
            TRY(cfg_int(c, "index_skip_topk_offset", 2, &off));
            TRY(cfg_check_range(c, "index_topk_freq", freq, -(1ll << 30), 1ll << 30));
            TRY(cfg_check_range(c, "index_skip_topk_offset", off, -(1ll << 30), 1ll << 30));
            if (freq < 1)
                freq = 1;
            for (int l = 0; l < d->n_layer; l++) {
                long long i = l - off + 1 > 0 ? l - off + 1 : 0;
                d->index_shared[l] = i % freq != 0;
            }
        }
    }
    if (d->index_shared[0])
        return td_err(c->err, c->errlen, TANDEM_EFORMAT,
                      "%s: layer 0 is a \"shared\" indexer layer but there is no earlier selection to share", c->file);
    return 0;
}
