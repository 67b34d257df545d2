/*
 * tensors.c - the tensor names and shapes each family's checkpoint holds.
 *
 * Names follow the published Hugging Face checkpoints (per-expert tensors,
 * "model.layers.N.mlp.experts.E.gate_proj.weight"); Mixtral keeps its
 * original "block_sparse_moe.experts.E.w1/w2/w3". Shapes are [out][in] as in
 * torch.nn.Linear. The loader checks every tensor listed here against the
 * file; nothing else in tandem spells a tensor name.
 */
#include "model/model.h"
#include "core/err.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    tensor_spec *v;
    int n, cap;
    int oom;
} spec_list;

static void add(spec_list *l, tensor_slot slot, int layer, int expert, int64_t rows, int64_t cols, int linear,
                const char *fmt, ...) __attribute__((format(printf, 8, 9)));

#include <stdarg.h>
static void add(spec_list *l, tensor_slot slot, int layer, int expert, int64_t rows, int64_t cols, int linear,
                const char *fmt, ...)
{
    if (l->oom)
        return;
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 256;
        tensor_spec *nv = realloc(l->v, (size_t)cap * sizeof *nv);
        if (!nv) {
            l->oom = 1;
            return;
        }
        l->v = nv;
        l->cap = cap;
    }
    tensor_spec *s = &l->v[l->n++];
    memset(s, 0, sizeof *s);
    s->slot = slot;
    s->layer = layer;
    s->expert = expert;
    s->rows = rows;
    s->cols = cols;
    s->ndim = cols ? 2 : 1;
    s->linear = linear;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->name, sizeof s->name, fmt, ap);
    va_end(ap);
}

#define VEC(slot, l, n, ...) add(&L, slot, l, -1, n, 0, 0, __VA_ARGS__)
#define MAT(slot, l, r, c, ...) add(&L, slot, l, -1, r, c, 1, __VA_ARGS__)

void model_fused_expert_prefix(const model_desc *d, int layer, char *buf, size_t n)
{
    snprintf(buf, n, "%slayers.%d.%s.experts", d->prefix[0] ? d->prefix : "model.", layer,
             d->arch == ARCH_MIXTRAL ? "block_sparse_moe" : "mlp");
}

int model_tensors(const model_desc *d, tensor_spec **out, int *n_out, char *err, size_t errlen)
{
    spec_list L = { 0 };
    const int D = d->d_model;
    const char *mp = d->prefix[0] ? d->prefix : "model."; /* the language model's prefix */
    add(&L, TS_EMBED, -1, -1, d->n_vocab, D, 0, "%sembed_tokens.weight", mp);
    for (int l = 0; l < d->n_layer; l++) {
        char p[80];
        snprintf(p, sizeof p, "%slayers.%d.", mp, l);
        VEC(TS_ATTN_NORM, l, D, "%sinput_layernorm.weight", p);
        VEC(TS_FFN_NORM, l, D, "%spost_attention_layernorm.weight", p);
        if (d->layer_linear && d->layer_linear[l]) { /* Gated DeltaNet (model_qwen35.c) */
            const int64_t kd = (int64_t)d->lin_k_heads * d->lin_k_dim, vd = (int64_t)d->lin_v_heads * d->lin_v_dim;
            if (d->lin_fused) {
                MAT(TS_LA_QKVZ, l, 2 * kd + 2 * vd, D, "%slinear_attn.in_proj_qkvz.weight", p);
                MAT(TS_LA_BA, l, 2 * d->lin_v_heads, D, "%slinear_attn.in_proj_ba.weight", p);
            } else {
                MAT(TS_LA_QKV, l, 2 * kd + vd, D, "%slinear_attn.in_proj_qkv.weight", p);
                MAT(TS_LA_Z, l, vd, D, "%slinear_attn.in_proj_z.weight", p);
                MAT(TS_LA_B, l, d->lin_v_heads, D, "%slinear_attn.in_proj_b.weight", p);
                MAT(TS_LA_A, l, d->lin_v_heads, D, "%slinear_attn.in_proj_a.weight", p);
            }
            add(&L, TS_LA_CONV, l, -1, 2 * kd + vd, d->lin_conv, 0, "%slinear_attn.conv1d.weight", p);
            VEC(TS_LA_DT_BIAS, l, d->lin_v_heads, "%slinear_attn.dt_bias", p);
            VEC(TS_LA_A_LOG, l, d->lin_v_heads, "%slinear_attn.A_log", p);
            VEC(TS_LA_NORM, l, d->lin_v_dim, "%slinear_attn.norm.weight", p);
            MAT(TS_LA_OUT, l, D, vd, "%slinear_attn.out_proj.weight", p);
        } else if (d->attn == ATTN_GQA) {
            int64_t q = (int64_t)d->n_head * d->head_dim, kv = (int64_t)d->n_kv_head * d->head_dim;
            MAT(TS_Q, l, d->attn_gate ? 2 * q : q, D, "%sself_attn.q_proj.weight", p);
            MAT(TS_K, l, kv, D, "%sself_attn.k_proj.weight", p);
            MAT(TS_V, l, kv, D, "%sself_attn.v_proj.weight", p);
            MAT(TS_O, l, D, q, "%sself_attn.o_proj.weight", p);
            if (d->qkv_bias) {
                VEC(TS_Q_BIAS, l, q, "%sself_attn.q_proj.bias", p);
                VEC(TS_K_BIAS, l, kv, "%sself_attn.k_proj.bias", p);
                VEC(TS_V_BIAS, l, kv, "%sself_attn.v_proj.bias", p);
            }
            if (d->o_bias)
                VEC(TS_O_BIAS, l, D, "%sself_attn.o_proj.bias", p);
            if (d->qk_norm) {
                VEC(TS_Q_NORM, l, d->head_dim, "%sself_attn.q_norm.weight", p);
                VEC(TS_K_NORM, l, d->head_dim, "%sself_attn.k_norm.weight", p);
            }
            if (d->oss)
                VEC(TS_SINKS, l, d->n_head, "%sself_attn.sinks", p);
        } else {
            int64_t qk = d->qk_nope_dim + d->qk_rope_dim;
            if (d->q_lora_rank) {
                MAT(TS_Q_A, l, d->q_lora_rank, D, "%sself_attn.q_a_proj.weight", p);
                VEC(TS_Q_A_NORM, l, d->q_lora_rank, "%sself_attn.q_a_layernorm.weight", p);
                MAT(TS_Q_B, l, d->n_head * qk, d->q_lora_rank, "%sself_attn.q_b_proj.weight", p);
            } else {
                MAT(TS_Q, l, d->n_head * qk, D, "%sself_attn.q_proj.weight", p);
            }
            MAT(TS_KV_A, l, d->kv_lora_rank + d->qk_rope_dim, D, "%sself_attn.kv_a_proj_with_mqa.weight", p);
            VEC(TS_KV_A_NORM, l, d->kv_lora_rank, "%sself_attn.kv_a_layernorm.weight", p);
            MAT(TS_KV_B, l, (int64_t)d->n_head * (d->qk_nope_dim + d->v_head_dim), d->kv_lora_rank,
                "%sself_attn.kv_b_proj.weight", p);
            MAT(TS_O, l, D, (int64_t)d->n_head * d->v_head_dim, "%sself_attn.o_proj.weight", p);
            if (d->dsa && !d->index_shared[l]) { /* the sparse-attention indexer (model_dsa.c) */
                const int64_t IH = d->index_n_heads, ID = d->index_head_dim;
                MAT(TS_IX_WQ_B, l, IH * ID, d->q_lora_rank, "%sself_attn.indexer.wq_b.weight", p);
                MAT(TS_IX_WK, l, ID, D, "%sself_attn.indexer.wk.weight", p);
                VEC(TS_IX_K_NORM, l, ID, "%sself_attn.indexer.k_norm.weight", p);
                VEC(TS_IX_K_NORM_BIAS, l, ID, "%sself_attn.indexer.k_norm.bias", p);
                add(&L, TS_IX_W, l, -1, IH, D, 0, "%sself_attn.indexer.weights_proj.weight", p);
            }
        }
        if (!d->layer_moe[l]) {
            MAT(TS_FFN_GATE, l, d->d_ff, D, "%smlp.gate_proj.weight", p);
            MAT(TS_FFN_UP, l, d->d_ff, D, "%smlp.up_proj.weight", p);
            MAT(TS_FFN_DOWN, l, D, d->d_ff, "%smlp.down_proj.weight", p);
            if (d->mlp_bias) {
                VEC(TS_FFN_GATE_BIAS, l, d->d_ff, "%smlp.gate_proj.bias", p);
                VEC(TS_FFN_UP_BIAS, l, d->d_ff, "%smlp.up_proj.bias", p);
                VEC(TS_FFN_DOWN_BIAS, l, D, "%smlp.down_proj.bias", p);
            }
            continue;
        }
        const int F = d->d_ff_expert;
        if (d->oss) { /* router with a bias; experts fused and transposed, [E * in][out] (model_oss.c) */
            const int64_t E = d->n_expert;
            add(&L, TS_ROUTER, l, -1, E, D, 0, "%smlp.router.weight", p);
            VEC(TS_OSS_ROUTER_BIAS, l, E, "%smlp.router.bias", p);
            add(&L, TS_OSS_GU, l, -1, E * D, 2 * (int64_t)F, 0, "%smlp.experts.gate_up_proj", p);
            add(&L, TS_OSS_GU_BIAS, l, -1, E, 2 * (int64_t)F, 0, "%smlp.experts.gate_up_proj_bias", p);
            add(&L, TS_OSS_DOWN, l, -1, E * F, D, 0, "%smlp.experts.down_proj", p);
            add(&L, TS_OSS_DOWN_BIAS, l, -1, E, D, 0, "%smlp.experts.down_proj_bias", p);
            continue;
        }
        const char *moe = d->arch == ARCH_MIXTRAL ? "block_sparse_moe" : "mlp";
        add(&L, TS_ROUTER, l, -1, d->n_expert, D, 0, "%s%s.gate.weight", p, moe);
        if (d->route_bias)
            VEC(TS_ROUTER_BIAS, l, d->n_expert, "%s%s.gate.e_score_correction_bias", p, moe);
        for (int e = 0; e < d->n_expert; e++) {
            if (d->arch == ARCH_MIXTRAL) {
                add(&L, TS_EXP_GATE, l, e, F, D, 1, "%s%s.experts.%d.w1.weight", p, moe, e);
                add(&L, TS_EXP_UP, l, e, F, D, 1, "%s%s.experts.%d.w3.weight", p, moe, e);
                add(&L, TS_EXP_DOWN, l, e, D, F, 1, "%s%s.experts.%d.w2.weight", p, moe, e);
            } else {
                add(&L, TS_EXP_GATE, l, e, F, D, 1, "%s%s.experts.%d.gate_proj.weight", p, moe, e);
                add(&L, TS_EXP_UP, l, e, F, D, 1, "%s%s.experts.%d.up_proj.weight", p, moe, e);
                add(&L, TS_EXP_DOWN, l, e, D, F, 1, "%s%s.experts.%d.down_proj.weight", p, moe, e);
            }
        }
        if (d->d_ff_shared) {
            const int S = d->d_ff_shared;
            const char *sh = d->arch == ARCH_QWEN2_MOE || d->arch == ARCH_QWEN35_MOE || d->arch == ARCH_QWEN3_NEXT
                                 ? "shared_expert"
                                 : "shared_experts";
            MAT(TS_SH_GATE, l, S, D, "%smlp.%s.gate_proj.weight", p, sh);
            MAT(TS_SH_UP, l, S, D, "%smlp.%s.up_proj.weight", p, sh);
            MAT(TS_SH_DOWN, l, D, S, "%smlp.%s.down_proj.weight", p, sh);
            if (d->mlp_bias) {
                VEC(TS_SH_GATE_BIAS, l, S, "%smlp.%s.gate_proj.bias", p, sh);
                VEC(TS_SH_UP_BIAS, l, S, "%smlp.%s.up_proj.bias", p, sh);
                VEC(TS_SH_DOWN_BIAS, l, D, "%smlp.%s.down_proj.bias", p, sh);
            }
            if (d->shared_gate)
                add(&L, TS_SH_GATE_INP, l, -1, 1, D, 0, "%smlp.shared_expert_gate.weight", p);
        }
    }
    VEC(TS_OUT_NORM, -1, D, "%snorm.weight", mp);
    if (!d->tie_embed)
        add(&L, TS_LM_HEAD, -1, -1, d->n_vocab, D, 0, "%slm_head.weight", d->head_prefix);
    if (L.oom) {
        free(L.v);
        return td_err(err, errlen, TANDEM_ENOMEM, "out of memory listing tensors");
    }
    *out = L.v;
    *n_out = L.n;
    return 0;
}

void model_param_counts(const model_desc *d, int64_t *total, int64_t *active)
{
    tensor_spec *v;
    int n;
    *total = *active = 0;
    if (model_tensors(d, &v, &n, NULL, 0) != 0)
        return;
    for (int i = 0; i < n; i++) {
        int64_t c = v[i].rows * (v[i].ndim == 2 ? v[i].cols : 1);
        *total += c;
        if (v[i].slot >= TS_OSS_GU && v[i].slot <= TS_OSS_DOWN_BIAS)
            *active += c / d->n_expert * d->n_expert_used; /* gpt-oss's fused experts: k of E */
        else if (v[i].expert < 0)
            *active += c;
        else if (v[i].expert < d->n_expert_used)
            *active += c; /* k experts' worth per token */
    }
    free(v);
}
