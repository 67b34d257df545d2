/*
 * model.h - one description for every supported model family.
 *
 * config.json is read once into a model_desc: dimensions, the attention kind
 * (GQA or MLA), the rope variant, the routing rule, and which layers are MoE.
 * The forward pass and the loader look only at this struct, never at the
 * family name, so a family is a config parser plus a tensor-name table
 * (model_tensors()). An unknown architecture or a config value we do not
 * implement is an error naming it, never a silently different model.
 */
#ifndef TD_MODEL_H
#define TD_MODEL_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    ARCH_QWEN3_MOE,
    ARCH_QWEN2_MOE,
    ARCH_MIXTRAL,
    ARCH_DEEPSEEK_V2,
    ARCH_DEEPSEEK_V3,
    ARCH_GLM4_MOE,
    ARCH_DEEPSEEK_V32,        /* DeepSeek-V3 + DeepSeek sparse attention (model_dsa.c) */
    ARCH_GLM_MOE_DSA,         /* GLM-5: the same, indexer rope interleaved, indexer shared across layers */
    ARCH_QWEN35_MOE,          /* Qwen3.5-MoE: Gated DeltaNet + gated full attention (model_qwen35.c) */
    ARCH_QWEN3_NEXT,          /* Qwen3-Next: the same with fused input projections */
    ARCH_GPT_OSS,             /* gpt-oss: attention sinks, alternating windows, biased experts (model_oss.c) */
} model_arch;

typedef enum { ATTN_GQA, ATTN_MLA } attn_kind;

/* ROPE_HALF: dims i and i + d/2 form a pair (rotate_half, "neox").
 * ROPE_PAIRS: dims 2i and 2i+1 form a pair (DeepSeek's interleaved layout).
 * Either way pair i turns by pos * inv_freq[i]. */
typedef enum { ROPE_HALF, ROPE_PAIRS } rope_style;

typedef enum {
    ROUTE_SOFTMAX,        /* softmax over all experts, top-k (Qwen, Mixtral, DeepSeek-V2 greedy) */
    ROUTE_SOFTMAX_GROUP,  /* DeepSeek-V2 group_limited_greedy: groups ranked by their max */
    ROUTE_SIGMOID_GROUP,  /* DeepSeek-V3 / GLM-4.5 noaux_tc: sigmoid + bias, groups by top-2 sum */
} route_kind;

#define MODEL_INT4_GROUP 32   /* columns per scale of compressed-tensors INT4 experts */

typedef struct {
    model_arch arch;
    char arch_name[64];       /* architectures[0], e.g. "DeepseekV3ForCausalLM" */
    char prefix[32];          /* tensor name prefix of the language model; "" = "model." (a multimodal
                                 checkpoint's text model: "model.language_model.", Kimi-K2.5:
                                 "language_model.model.") */
    char head_prefix[32];     /* lm_head's name prefix: "" (Kimi-K2.5: "language_model.") */
    int n_layer, d_model, n_vocab, max_ctx;
    float rms_eps;
    int tie_embed;

    /* attention */
    attn_kind attn;
    int n_head, n_kv_head;
    int head_dim;             /* GQA: q/k/v head size */
    int qkv_bias, o_bias, qk_norm;
    int q_lora_rank;          /* MLA; 0 = plain q_proj */
    int kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim;
    int sliding_window;       /* 0 = full attention */
    float attn_scale;         /* softmax scale, yarn mscale folded in */

    /* rope */
    rope_style rope;
    int rope_dim;             /* rotated dims per head (partial rotary: < head size) */
    double rope_theta;
    int rope_yarn;
    double yarn_factor, yarn_beta_fast, yarn_beta_slow;
    int yarn_orig_ctx, yarn_truncate;
    float rope_scale;         /* factor on cos/sin (yarn attention_factor), 1 otherwise */

    /* feed-forward */
    int d_ff;                 /* dense layers */
    int mlp_bias;             /* dense and shared MLPs carry biases */
    uint8_t *layer_moe;       /* [n_layer] 1 = MoE layer */
    int n_layer_moe;
    int n_expert, n_expert_used, d_ff_expert;
    int d_ff_shared;          /* 0 = no shared expert */
    int shared_gate;          /* Qwen2-MoE: sigmoid(shared_expert_gate . h) scales the shared expert */
    route_kind route;
    int norm_topk;            /* renormalise the top-k weights to sum 1 */
    float route_scale;        /* routed_scaling_factor */
    int n_group, topk_group;
    int route_bias;           /* e_score_correction_bias present */

    /* storage */
    int fp8;                  /* checkpoint weights are FP8 E4M3 with block scales */
    int fp8_block[2];         /* [rows, cols] of one scale block */
    int expert_int4;          /* routed experts may be compressed-tensors pack-quantized INT4, symmetric,
                                 group 32 (Kimi-K2-Thinking / K2.5): X.weight_packed [rows][cols/8] I32,
                                 X.weight_scale [rows][cols/32] BF16, X.weight_shape [2] I32 (load.c);
                                 every other tensor is stored unquantised */

    /* DeepSeek sparse attention (DSA; model_dsa.c): per layer a lightning
     * indexer scores the past positions and MLA attends to the index_topk best */
    int dsa;
    int index_n_heads, index_head_dim, index_topk;
    int index_rope_pairs;     /* rope layout of the indexer's first qk_rope_dim dims (GLM-5: pairs) */
    uint8_t *index_shared;    /* [n_layer] 1 = no indexer: reuse the previous layer's selection (GLM-5) */

    /* hybrid linear attention (Qwen3.5-MoE, Qwen3-Next; model_qwen35.c) */
    uint8_t *layer_linear;    /* [n_layer] 1 = Gated DeltaNet layer, 0 = full attention; NULL: none */
    int n_layer_linear;
    int attn_gate;            /* q_proj yields [q | gate] per head; the attention output is * sigmoid(gate) */
    int norm_offset;          /* RMSNorm weights stored zero-centred: the scale is 1 + w */
    int lin_conv;             /* causal conv1d kernel width */
    int lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim;
    int lin_fused;            /* Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head */

    /* gpt-oss (model_oss.c; forward_oss.c) */
    int oss;
    uint8_t *layer_window;    /* [n_layer] 1 = sliding_window attention, 0 = full */
    float swiglu_alpha, swiglu_limit; /* act = (clamp(up, +-limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit) */

    int bos_id, eos_id;       /* -1 if unknown */
} model_desc;

/* Read a Hugging Face config.json. */
int model_load_config(model_desc *d, const char *config_path, char *err, size_t errlen);
void model_desc_free(model_desc *d);

/* ---- tensors a model needs ---------------------------------------------- */
typedef enum {
    TS_EMBED, TS_OUT_NORM, TS_LM_HEAD,
    TS_ATTN_NORM, TS_FFN_NORM,
    TS_Q, TS_K, TS_V, TS_O, TS_Q_BIAS, TS_K_BIAS, TS_V_BIAS, TS_O_BIAS, TS_Q_NORM, TS_K_NORM,
    TS_Q_A, TS_Q_A_NORM, TS_Q_B, TS_KV_A, TS_KV_A_NORM, TS_KV_B,
    TS_FFN_GATE, TS_FFN_UP, TS_FFN_DOWN, TS_FFN_GATE_BIAS, TS_FFN_UP_BIAS, TS_FFN_DOWN_BIAS,
    TS_ROUTER, TS_ROUTER_BIAS,
    TS_EXP_GATE, TS_EXP_UP, TS_EXP_DOWN,
    TS_SH_GATE, TS_SH_UP, TS_SH_DOWN, TS_SH_GATE_BIAS, TS_SH_UP_BIAS, TS_SH_DOWN_BIAS, TS_SH_GATE_INP,
    TS_IX_WQ_B, TS_IX_WK, TS_IX_K_NORM, TS_IX_K_NORM_BIAS, TS_IX_W, /* DSA indexer (model_dsa.c) */
    TS_LA_QKV, TS_LA_Z, TS_LA_B, TS_LA_A, TS_LA_QKVZ, TS_LA_BA,      /* Gated DeltaNet (model_qwen35.c) */
    TS_LA_CONV, TS_LA_DT_BIAS, TS_LA_A_LOG, TS_LA_NORM, TS_LA_OUT,
    TS_SINKS, TS_OSS_ROUTER_BIAS, TS_OSS_GU, TS_OSS_GU_BIAS, TS_OSS_DOWN, TS_OSS_DOWN_BIAS, /* gpt-oss */
    TS_COUNT
} tensor_slot;

typedef struct {
    tensor_slot slot;
    int layer, expert;        /* -1 when not per layer / per expert */
    char name[128];
    int ndim;                 /* 1 or 2 */
    int64_t rows, cols;       /* 2-D: [rows][cols] (out x in); 1-D: [rows] */
    int linear;               /* a projection stored as FP8 in native FP8 checkpoints */
} tensor_spec;

/* Every tensor the model needs, in load order. *out is malloc'd. */
int model_tensors(const model_desc *d, tensor_spec **out, int *n, char *err, size_t errlen);

/* Fused-expert fallback (checkpoints saved with experts as 3-D tensors):
 * "<prefix>.gate_up_proj" [E][2F][D] and "<prefix>.down_proj" [E][D][F]. */
void model_fused_expert_prefix(const model_desc *d, int layer, char *buf, size_t n);

/* Parameter counts: all, and those touched per token. */
void model_param_counts(const model_desc *d, int64_t *total, int64_t *active);

const char *model_route_name(route_kind r);

/* NULL when the hybrid (GPU) engine runs this model; else the feature its
 * GPU path lacks, for a message ("DeepSeek sparse attention"): such models
 * run CPU-only (families.c). */
const char *model_gpu_unsupported(const model_desc *d);
/* The attention kind in words ("GQA", "MLA", "MLA + DeepSeek sparse attention"). */
const char *model_attn_name(const model_desc *d);
/* fp32 cache values a token adds beyond the KV cache proper, all layers
 * together (DSA's indexer keys) */
int64_t model_extra_cache_floats(const model_desc *d);

#endif
