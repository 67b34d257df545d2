/*
 * gguf_arch.c - GGUF metadata and tensor names -> model_desc (gguf_arch.h).
 *
 * Keys are "<arch>.<name>" as llama.cpp's converter writes them
 * (convert_hf_to_gguf.py, gguf-py constants); defaults are llama.cpp's where
 * a key is optional, so a file means here what it means there. What llama.cpp
 * hard-codes per architecture (qwen3moe renormalises the top-k weights,
 * qwen2moe does not) is hard-coded the same way.
 */
#include "model/gguf_arch.h"
#include "core/err.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TRY(x)                    \
    do {                          \
        int rc_ = (x);            \
        if (rc_ < 0)              \
            return rc_;           \
    } while (0)

typedef struct {
    const gguf_file *g;
    const char *arch;
    char *err;
    size_t errlen;
} kctx;

static const char *key(const kctx *k, const char *name, char *buf, size_t n)
{
    snprintf(buf, n, "%s.%s", k->arch, name);
    return buf;
}

/* "<arch>.name" as an int in [lo, hi]; def when absent (required: error). */
static int kint(const kctx *k, const char *name, int required, long long def, long long lo, long long hi, int *out)
{
    char b[160];
    key(k, name, b, sizeof b);
    const gguf_kv *kv = gguf_find_kv(k->g, b);
    if (!kv) {
        if (required)
            return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: metadata key '%s' is missing", gguf_path(k->g), b);
        *out = (int)def;
        return 0;
    }
    uint32_t u;
    int32_t i;
    long long v;
    if (kv->type == GGUF_V_ARR) {
        /* per-layer arrays (llama.cpp's get_key_or_arr): all entries must agree here */
        if (!kv->arr_n || kv->arr_type == GGUF_V_STR)
            return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: metadata key '%s' is an empty or string array",
                          gguf_path(k->g), b);
        v = gguf_arr_i64(kv, 0);
        for (uint64_t j = 1; j < kv->arr_n; j++)
            if (gguf_arr_i64(kv, j) != v)
                return td_err(k->err, k->errlen, TANDEM_EUNSUPPORTED,
                              "%s: metadata key '%s' differs between layers: not supported", gguf_path(k->g), b);
    } else if (gguf_get_i32(k->g, b, &i, NULL, 0) == 0) {
        v = i;
    } else {
        TRY(gguf_get_u32(k->g, b, &u, k->err, k->errlen));
        v = u;
    }
    if (v < lo || v > hi)
        return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: metadata key '%s' = %lld is not in [%lld, %lld]",
                      gguf_path(k->g), b, v, lo, hi);
    *out = (int)v;
    return 0;
}

static int kf32(const kctx *k, const char *name, float def, float *out)
{
    char b[160];
    int rc = gguf_get_f32_opt(k->g, key(k, name, b, sizeof b), out, k->err, k->errlen);
    if (rc == 1)
        *out = def;
    return rc < 0 ? rc : 0;
}

static int kbool(const kctx *k, const char *name, int def, int *out)
{
    char b[160];
    int rc = gguf_get_bool_opt(k->g, key(k, name, b, sizeof b), out, k->err, k->errlen);
    if (rc == 1)
        *out = def;
    return rc < 0 ? rc : 0;
}

static int has_tensor(const gguf_file *g, const char *fmt, int l)
{
    char n[96];
    snprintf(n, sizeof n, fmt, l);
    return gguf_find_tensor(g, n) != NULL;
}

static double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0; }

/* rope.scaling.*: none, or yarn (GQA: attention factor 0.1 ln(f) + 1 on
 * cos/sin; MLA: the softmax scale times mscale(all_dim)^2, as config.c). */
static int parse_rope_scaling(model_desc *d, const kctx *k)
{
    char b[160];
    const char *type = "none";
    TRY(gguf_get_str_opt(k->g, key(k, "rope.scaling.type", b, sizeof b), &type, k->err, k->errlen));
    d->rope_scale = 1.0f;
    if (!strcmp(type, "none"))
        return 0;
    if (strcmp(type, "yarn"))
        return td_err(k->err, k->errlen, TANDEM_EUNSUPPORTED,
                      "%s: %s.rope.scaling.type '%s' is not supported yet (none, yarn)", gguf_path(k->g), k->arch,
                      type);
    float factor, log_mul;
    int orig;
    TRY(kf32(k, "rope.scaling.factor", 0, &factor));
    TRY(kint(k, "rope.scaling.original_context_length", 1, 0, 1, 1 << 30, &orig));
    TRY(kf32(k, "rope.scaling.yarn_log_multiplier", 0, &log_mul));
    if (!(factor > 0))
        return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: %s.rope.scaling.factor must be > 0", gguf_path(k->g),
                      k->arch);
    d->rope_yarn = 1;
    d->yarn_factor = factor;
    d->yarn_orig_ctx = orig;
    d->yarn_beta_fast = 32;
    d->yarn_beta_slow = 1;
    d->yarn_truncate = 1;
    if (d->attn == ATTN_MLA) {
        /* the converter stores 0.1 * mscale_all_dim; DeepSeek configs have mscale == mscale_all_dim, so the
         * cos/sin factor is 1 and the softmax scale takes mscale^2 */
        double m = yarn_mscale(factor, log_mul / 0.1);
        d->attn_scale = (float)(d->attn_scale * m * m);
    } else {
        d->rope_scale = (float)yarn_mscale(factor, 1);
    }
    return 0;
}

static int parse(model_desc *d, const kctx *k)
{
    const gguf_file *g = k->g;
    const char *path = gguf_path(g);
    const char *a = k->arch;
    int is_ds = !strcmp(a, "deepseek2");
    int v, nextn;
    TRY(kint(k, "block_count", 1, 0, 1, 1024, &v));
    TRY(kint(k, "nextn_predict_layers", 0, 0, 0, v - 1, &nextn));
    d->n_layer = v - nextn; /* the MTP layers at the end are not run */
    TRY(kint(k, "embedding_length", 1, 0, 1, 1 << 20, &d->d_model));
    TRY(kint(k, "context_length", 0, 4096, 1, 1 << 30, &d->max_ctx));
    TRY(kf32(k, "attention.layer_norm_rms_epsilon", 1e-6f, &d->rms_eps));
    const gguf_tensor *emb = gguf_find_tensor(g, "token_embd.weight");
    if (!emb || emb->ndim != 2 || emb->ne[0] != d->d_model || emb->ne[1] < 1 || emb->ne[1] > (1 << 24))
        return td_err(k->err, k->errlen, TANDEM_EFORMAT,
                      "%s: tensor 'token_embd.weight' is %s, expected [%d x n_vocab]", path,
                      emb ? "of another shape" : "missing", d->d_model);
    d->n_vocab = (int)emb->ne[1];
    d->tie_embed = gguf_find_tensor(g, "output.weight") == NULL;
    TRY(kint(k, "attention.head_count", 1, 0, 1, 4096, &d->n_head));
    TRY(kint(k, "attention.head_count_kv", 0, d->n_head, 1, d->n_head, &d->n_kv_head));
    TRY(kint(k, "feed_forward_length", 0, 0, 0, 1 << 22, &d->d_ff));
    uint32_t tok;
    d->bos_id = d->eos_id = -1;
    if (gguf_get_u32_opt(g, "tokenizer.ggml.bos_token_id", &tok, NULL, 0) == 0)
        d->bos_id = (int)tok;
    if (gguf_get_u32_opt(g, "tokenizer.ggml.eos_token_id", &tok, NULL, 0) == 0)
        d->eos_id = (int)tok;
    double theta;
    float th;
    TRY(kf32(k, "rope.freq_base", 10000.0f, &th));
    theta = th;
    d->rope_theta = theta;

    /* ---- attention ---- */
    if (is_ds) {
        int kl, vl, rot;
        d->attn = ATTN_MLA;
        TRY(kint(k, "attention.q_lora_rank", 0, 0, 0, 1 << 16, &d->q_lora_rank));
        TRY(kint(k, "attention.kv_lora_rank", 1, 0, 1, 1 << 16, &d->kv_lora_rank));
        TRY(kint(k, "rope.dimension_count", 1, 0, 2, 4096, &rot));
        /* newer files (split k_b / v_b) give the per-head sizes as *_mla and the absorbed ones plain */
        char b[160];
        if (gguf_find_kv(g, key(k, "attention.key_length_mla", b, sizeof b))) {
            TRY(kint(k, "attention.key_length_mla", 1, 0, 3, 8192, &kl));
            TRY(kint(k, "attention.value_length_mla", 1, 0, 1, 4096, &vl));
        } else {
            TRY(kint(k, "attention.key_length", 1, 0, 3, 8192, &kl));
            TRY(kint(k, "attention.value_length", 1, 0, 1, 4096, &vl));
        }
        if (kl <= rot)
            return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: key length %d is not above the rope dims %d", path,
                          kl, rot);
        d->qk_rope_dim = rot;
        d->qk_nope_dim = kl - rot;
        d->v_head_dim = vl;
        d->rope_dim = rot;
        d->rope = ROPE_PAIRS;
        d->attn_scale = (float)(1.0 / sqrt((double)kl));
        d->n_kv_head = d->n_head;
    } else {
        d->attn = ATTN_GQA;
        TRY(kint(k, "attention.key_length", 0, d->d_model / d->n_head, 2, 4096, &d->head_dim));
        int vl;
        TRY(kint(k, "attention.value_length", 0, d->head_dim, 1, 4096, &vl));
        if (vl != d->head_dim)
            return td_err(k->err, k->errlen, TANDEM_EUNSUPPORTED,
                          "%s: %s.attention.value_length %d differs from key_length %d: not supported", path, a, vl,
                          d->head_dim);
        TRY(kint(k, "rope.dimension_count", 0, d->head_dim, 2, d->head_dim, &d->rope_dim));
        d->rope_dim &= ~1;
        d->attn_scale = (float)(1.0 / sqrt((double)d->head_dim));
        d->rope = !strcmp(a, "llama") ? ROPE_PAIRS : ROPE_HALF;
        d->qkv_bias = gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
        d->o_bias = gguf_find_tensor(g, "blk.0.attn_output.bias") != NULL;
        d->qk_norm = gguf_find_tensor(g, "blk.0.attn_q_norm.weight") != NULL;
        int sw;
        TRY(kint(k, "attention.sliding_window", 0, 0, 0, 1 << 30, &sw));
        if (sw)
            return td_err(k->err, k->errlen, TANDEM_EUNSUPPORTED, "%s: %s.attention.sliding_window is not supported",
                          path, a);
    }
    TRY(parse_rope_scaling(d, k));

    /* ---- experts and routing ---- */
    TRY(kint(k, "expert_count", 0, 0, 0, 1 << 16, &d->n_expert));
    if (d->n_expert < 2)
        return td_err(k->err, k->errlen, TANDEM_EUNSUPPORTED,
                      "%s: architecture '%s' without experts (%s.expert_count %d): tandem runs MoE models only", path,
                      a, a, d->n_expert);
    TRY(kint(k, "expert_used_count", 1, 0, 1, d->n_expert, &d->n_expert_used));
    TRY(kint(k, "expert_feed_forward_length", 0, d->d_ff, 1, 1 << 22, &d->d_ff_expert));
    d->layer_moe = calloc((size_t)d->n_layer, 1);
    if (!d->layer_moe)
        return td_err(k->err, k->errlen, TANDEM_ENOMEM, "out of memory");
    /* a layer is MoE where the file has its router (llama.cpp decides per layer the same way for these) */
    for (int l = 0; l < d->n_layer; l++) {
        d->layer_moe[l] = has_tensor(g, "blk.%d.ffn_gate_inp.weight", l);
        d->n_layer_moe += d->layer_moe[l];
    }
    if (d->n_layer_moe < d->n_layer && d->d_ff <= 0)
        return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: dense layers need %s.feed_forward_length > 0", path, a);
    d->n_group = d->topk_group = 1;
    d->route_scale = 1.0f;
    if (!strcmp(a, "qwen3moe") || !strcmp(a, "qwen2moe") || !strcmp(a, "llama")) {
        d->route = ROUTE_SOFTMAX;
        d->norm_topk = strcmp(a, "qwen2moe") != 0;
        if (!strcmp(a, "qwen2moe")) {
            TRY(kint(k, "expert_shared_feed_forward_length", 0, d->d_ff, 0, 1 << 22, &d->d_ff_shared));
            if (!has_tensor(g, "blk.%d.ffn_gate_shexp.weight", 0) && !has_tensor(g, "blk.%d.ffn_gate_shexp.weight", 1))
                d->d_ff_shared = 0;
            d->shared_gate = d->d_ff_shared > 0;
        }
    } else {
        int n_shared, func, norm;
        float scale;
        TRY(kint(k, "expert_shared_count", 0, 0, 0, 1024, &n_shared));
        d->d_ff_shared = n_shared * d->d_ff_expert;
        TRY(kint(k, "expert_gating_func", 0, is_ds ? 1 : 2, 0, 3, &func));
        if (func == 0)
            func = is_ds ? 1 : 2;
        TRY(kbool(k, "expert_weights_norm", 0, &norm));
        TRY(kf32(k, "expert_weights_scale", 0.0f, &scale));
        d->norm_topk = norm;
        d->route_scale = scale != 0.0f ? scale : 1.0f;
        TRY(kint(k, "expert_group_count", 0, 1, 1, d->n_expert, &d->n_group));
        if (d->n_group < 1)
            d->n_group = 1;
        TRY(kint(k, "expert_group_used_count", 0, d->n_group, 1, d->n_group, &d->topk_group));
        if (d->n_expert % d->n_group)
            return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: %d experts do not split into %d groups", path,
                          d->n_expert, d->n_group);
        if (func == 2) {
            d->route = ROUTE_SIGMOID_GROUP;
            d->route_bias = has_tensor(g, "blk.%d.exp_probs_b.bias", d->n_layer - 1);
        } else if (func == 1) {
            d->route = d->n_group > 1 ? ROUTE_SOFTMAX_GROUP : ROUTE_SOFTMAX;
        } else {
            return td_err(k->err, k->errlen, TANDEM_EUNSUPPORTED, "%s: %s.expert_gating_func %d is not supported",
                          path, a, func);
        }
        if (d->route != ROUTE_SOFTMAX && d->topk_group * (d->n_expert / d->n_group) < d->n_expert_used)
            return td_err(k->err, k->errlen, TANDEM_EFORMAT, "%s: %d groups of %d experts cannot supply %d", path,
                          d->topk_group, d->n_expert / d->n_group, d->n_expert_used);
    }
    return 0;
}

static const struct {
    const char *name;
    model_arch id;
} archs[] = {
    { "qwen3moe", ARCH_QWEN3_MOE }, { "qwen2moe", ARCH_QWEN2_MOE }, { "llama", ARCH_MIXTRAL },
    { "deepseek2", ARCH_DEEPSEEK_V3 }, { "glm4moe", ARCH_GLM4_MOE },
};

int model_load_gguf(model_desc *d, const gguf_file *g, char *err, size_t errlen)
{
    memset(d, 0, sizeof *d);
    const char *a = gguf_arch(g);
    if (!a)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: metadata key 'general.architecture' is missing",
                      gguf_path(g));
    int found = -1;
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if (!strcmp(a, archs[i].name))
            found = (int)i;
    if (found < 0)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "%s: GGUF architecture '%s' is not supported; supported: qwen3moe, qwen2moe, llama (Mixtral), "
                      "deepseek2, glm4moe",
                      gguf_path(g), a);
    d->arch = archs[found].id;
    snprintf(d->arch_name, sizeof d->arch_name, "gguf:%s", a);
    kctx k = { g, a, err, errlen };
    int rc = parse(d, &k);
    if (!rc && d->arch == ARCH_DEEPSEEK_V3 && d->route != ROUTE_SIGMOID_GROUP)
        d->arch = ARCH_DEEPSEEK_V2; /* softmax routing: DeepSeek-V2's rules */
    if (rc)
        model_desc_free(d);
    return rc;
}

/* ---- tensors ---------------------------------------------------------------- */

/* llama.cpp's name of a slot, "blk.%d." prefixed where per layer */
static const char *slot_name(const model_desc *d, tensor_slot s)
{
    switch (s) {
    case TS_EMBED: return "token_embd.weight";
    case TS_OUT_NORM: return "output_norm.weight";
    case TS_LM_HEAD: return "output.weight";
    case TS_ATTN_NORM: return "attn_norm.weight";
    /* GLM-4.5's pre-MLP norm is post_attention_norm in llama.cpp's names */
    case TS_FFN_NORM: return d->arch == ARCH_GLM4_MOE ? "post_attention_norm.weight" : "ffn_norm.weight";
    case TS_Q: return "attn_q.weight";
    case TS_K: return "attn_k.weight";
    case TS_V: return "attn_v.weight";
    case TS_O: return "attn_output.weight";
    case TS_Q_BIAS: return "attn_q.bias";
    case TS_K_BIAS: return "attn_k.bias";
    case TS_V_BIAS: return "attn_v.bias";
    case TS_O_BIAS: return "attn_output.bias";
    case TS_Q_NORM: return "attn_q_norm.weight";
    case TS_K_NORM: return "attn_k_norm.weight";
    case TS_Q_A: return "attn_q_a.weight";
    case TS_Q_A_NORM: return "attn_q_a_norm.weight";
    case TS_Q_B: return "attn_q_b.weight";
    case TS_KV_A: return "attn_kv_a_mqa.weight";
    case TS_KV_A_NORM: return "attn_kv_a_norm.weight";
    case TS_KV_B: return "attn_kv_b.weight";
    case TS_FFN_GATE: return "ffn_gate.weight";
    case TS_FFN_UP: return "ffn_up.weight";
    case TS_FFN_DOWN: return "ffn_down.weight";
    case TS_ROUTER: return "ffn_gate_inp.weight";
    case TS_ROUTER_BIAS: return "exp_probs_b.bias";
    case TS_EXP_GATE: return "ffn_gate_exps.weight";
    case TS_EXP_UP: return "ffn_up_exps.weight";
    case TS_EXP_DOWN: return "ffn_down_exps.weight";
    case TS_SH_GATE: return "ffn_gate_shexp.weight";
    case TS_SH_UP: return "ffn_up_shexp.weight";
    case TS_SH_DOWN: return "ffn_down_shexp.weight";
    case TS_SH_GATE_INP: return "ffn_gate_inp_shexp.weight";
    default: return NULL;
    }
}

static int check_type(const gguf_file *g, const gguf_tensor *t, char *err, size_t errlen)
{
    if (!gguf_type_readable(t->type))
        return td_err(err, errlen, TANDEM_EUNSUPPORTED,
                      "%s: tensor '%s' is %s, which tandem cannot read yet (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, "
                      "Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)",
                      gguf_file_path(g, t->file), t->name, gguf_type_name(t->type));
    return 0;
}

static int bad_shape(const gguf_file *g, const gguf_tensor *t, const int64_t *want, int nd, char *err, size_t errlen)
{
    char have[96], w[96];
    int k = 0;
    for (int i = 0; i < t->ndim; i++)
        k += snprintf(have + k, sizeof have - (size_t)k, "%s%lld", i ? ", " : "{", (long long)t->ne[i]);
    snprintf(have + k, sizeof have - (size_t)k, "}");
    k = 0;
    for (int i = 0; i < nd; i++)
        k += snprintf(w + k, sizeof w - (size_t)k, "%s%lld", i ? ", " : "{", (long long)want[i]);
    snprintf(w + k, sizeof w - (size_t)k, "}");
    return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' has ne %s, expected %s (from the metadata)",
                  gguf_file_path(g, t->file), t->name, have, w);
}

static int same_shape(const gguf_tensor *t, const int64_t *want, int nd)
{
    for (int i = 0; i < GGUF_MAX_DIMS; i++)
        if (t->ne[i] != (i < nd ? want[i] : 1))
            return 0;
    return 1;
}

int model_gguf_find(const model_desc *d, const gguf_file *g, const tensor_spec *s, gguf_ref *out, char *err,
                    size_t errlen)
{
    memset(out, 0, sizeof *out);
    const char *base = slot_name(d, s->slot);
    if (!base)
        return td_err(err, errlen, TANDEM_EUNSUPPORTED, "%s: tensor '%s' has no GGUF name in tandem", gguf_path(g),
                      s->name);
    if (s->layer >= 0)
        snprintf(out->name, sizeof out->name, "blk.%d.%s", s->layer, base);
    else
        snprintf(out->name, sizeof out->name, "%s", base);
    /* 1-D vectors and [1][D] (qwen2moe's shared expert gate) are stored as ne = {n} */
    int64_t want[3] = { s->ndim == 2 ? s->cols : s->rows, s->ndim == 2 ? s->rows : 1, 0 };
    int nd = s->ndim == 2 && s->rows > 1 ? 2 : 1;
    if (s->ndim == 2 && s->rows == 1)
        want[0] = s->cols;

    if (s->expert >= 0) {
        const gguf_tensor *t = gguf_find_tensor(g, out->name);
        if (t) {
            want[2] = d->n_expert;
            if (!same_shape(t, want, 3))
                return bad_shape(g, t, want, 3, err, errlen);
            out->kind = GGUF_REF_EXPERT;
            out->t = t;
            out->expert = s->expert;
            return check_type(g, t, err, errlen);
        }
        /* older files: one tensor per expert, "blk.L.ffn_gate.E.weight" */
        static const char *per[] = { "ffn_gate", "ffn_up", "ffn_down" };
        int w = s->slot == TS_EXP_GATE ? 0 : s->slot == TS_EXP_UP ? 1 : 2;
        char n2[96];
        snprintf(n2, sizeof n2, "blk.%d.%s.%d.weight", s->layer, per[w], s->expert);
        t = gguf_find_tensor(g, n2);
        if (!t)
            return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' (or '%s') is missing (needed by %s)",
                          gguf_path(g), out->name, n2, d->arch_name);
        snprintf(out->name, sizeof out->name, "%s", n2);
        if (!same_shape(t, want, 2))
            return bad_shape(g, t, want, 2, err, errlen);
        out->t = t;
        return check_type(g, t, err, errlen);
    }

    const gguf_tensor *t = gguf_find_tensor(g, out->name);
    if (!t && s->slot == TS_KV_B) {
        /* split form: k_b ne = {nope, R, H} (k_b^T per head), v_b ne = {R, v, H} */
        char nk[96], nv[96];
        snprintf(nk, sizeof nk, "blk.%d.attn_k_b.weight", s->layer);
        snprintf(nv, sizeof nv, "blk.%d.attn_v_b.weight", s->layer);
        const gguf_tensor *tk = gguf_find_tensor(g, nk), *tv = gguf_find_tensor(g, nv);
        if (!tk || !tv)
            return td_err(err, errlen, TANDEM_EFORMAT,
                          "%s: layer %d has neither 'attn_kv_b.weight' nor both 'attn_k_b.weight' and "
                          "'attn_v_b.weight'",
                          gguf_path(g), s->layer);
        int64_t wk[3] = { d->qk_nope_dim, d->kv_lora_rank, d->n_head };
        int64_t wv[3] = { d->kv_lora_rank, d->v_head_dim, d->n_head };
        if (!same_shape(tk, wk, 3))
            return bad_shape(g, tk, wk, 3, err, errlen);
        if (!same_shape(tv, wv, 3))
            return bad_shape(g, tv, wv, 3, err, errlen);
        out->kind = GGUF_REF_KV_B;
        out->t = tk;
        out->t2 = tv;
        int rc = check_type(g, tk, err, errlen);
        return rc ? rc : check_type(g, tv, err, errlen);
    }
    if (!t)
        return td_err(err, errlen, TANDEM_EFORMAT, "%s: tensor '%s' is missing (needed by %s)", gguf_path(g),
                      out->name, d->arch_name);
    if (!same_shape(t, want, nd))
        return bad_shape(g, t, want, nd, err, errlen);
    out->t = t;
    return check_type(g, t, err, errlen);
}
