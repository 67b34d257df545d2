/*
 * engine.h - the insides of tandem_engine and tandem_session (runtime only).
 *
 * The engine owns the model description, the weight views (pointing into
 * the mmap'd checkpoint, or into buffers converted at load), the thread pool
 * and the rope tables. The session owns the KV cache and every scratch
 * buffer the forward pass touches, sized at creation.
 */
#ifndef TD_RUNTIME_ENGINE_H
#define TD_RUNTIME_ENGINE_H

#include "tandem.h"
#include "core/pool.h"
#include "cpu/ops.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/model.h"

typedef struct {
    float *attn_norm, *ffn_norm;              /* [d_model] */
    /* GQA */
    mat q, k, v, o;                           /* [n_head*hd][D], [n_kv*hd][D], .., [D][n_head*hd] */
    float *q_bias, *k_bias, *v_bias, *o_bias;
    float *q_norm, *k_norm;                   /* [head_dim] */
    /* MLA */
    mat q_a, q_b, kv_a, kv_b;                 /* [rq][D], [H*qk][rq], [R+rope][D], [H*(nope+v)][R] */
    float *q_a_norm, *kv_a_norm;              /* [rq], [R] */
    /* dense MLP */
    mat ffn_gate, ffn_up, ffn_down;           /* [F][D], [F][D], [D][F] */
    float *ffn_gate_bias, *ffn_up_bias, *ffn_down_bias;
    /* MoE */
    mat router;                               /* [E][D] */
    float *router_bias;                       /* [E] */
    mat *exp_gate, *exp_up, *exp_down;        /* [E] each: [Fe][D], [Fe][D], [D][Fe] */
    mat sh_gate, sh_up, sh_down;              /* [Fs][D], [Fs][D], [D][Fs] */
    float *sh_gate_bias, *sh_up_bias, *sh_down_bias;
    mat sh_gate_inp;                          /* [1][D] */
    /* DSA indexer (DeepSeek-V3.2, GLM-5; forward_dsa.c) */
    mat ix_wq_b, ix_wk, ix_w;                 /* [IH*ID][rq], [ID][D], [IH][D] */
    float *ix_k_norm, *ix_k_norm_bias;        /* [ID] LayerNorm weight, bias */
    /* Gated DeltaNet (Qwen3.5-MoE, Qwen3-Next; forward_gdn.c): qkv [2*Hk*dk + Hv*dv][D], z [Hv*dv][D],
     * b, a [Hv][D] (Qwen3-Next: qkvz, ba grouped per key head), out [D][Hv*dv], conv [2*Hk*dk + Hv*dv][K] */
    mat la_qkv, la_z, la_b, la_a, la_qkvz, la_ba, la_out, la_conv;
    float *la_dt_bias, *la_a_log, *la_norm;   /* [Hv], [Hv], [dv] */
    /* gpt-oss (forward_oss.c) */
    float *sinks;                             /* [n_head] */
    float *oss_router_bias;                   /* [E] */
    mat oss_gu, oss_gu_bias, oss_down, oss_down_bias; /* [E*D][2F], [E][2F], [E*F][D], [E][D] */
} layer_weights;

struct tandem_engine {
    model_desc d;
    tandem_engine_params params;
    char path[1024];            /* the model directory, for messages */
    st_set *st;                 /* NULL with dummy weights or a GGUF file */
    gguf_file *gg;              /* the GGUF file (or split set) the model came from; NULL for safetensors */
    pool *pool;
    int isa;
    mat embed, lm_head;         /* [V][D] */
    float *out_norm;            /* [D] */
    layer_weights *layers;      /* [n_layer] */
    void **owned;               /* buffers made at load (converted tensors) */
    int n_owned, cap_owned;
    int64_t owned_bytes;        /* their sizes added up (what the memory plan is checked against) */
    int64_t mapped_bytes;       /* bytes of checkpoint tensors used in place from the mapping (resident once read) */
    int experts_materialised;   /* routed experts are BF16/F32 matrices for the reference loop (--cpu-experts f32);
                                   otherwise views of the checkpoint in its own dtype (or dummy generators), read
                                   only while packing (runtime/experts.c) */
    int pack_state;             /* PACK_*: what `tandem convert`'s packs for params.cpu_experts are (runtime/pack.c) */
    float *rope_inv_freq;       /* [rope_dim/2] */
    int64_t weight_bytes;
    struct moe_op **moe;        /* [n_layer] packed CPU experts (CPU-only runs), NULL when not MoE */
    struct hybrid_engine *hy;   /* GPU placement and weights (runtime/hybrid.h); NULL = CPU only */
};

typedef struct {
    float *k, *v;               /* GQA: [n_seq][n_ctx][n_kv*hd] */
    float *ckv, *kpe;           /* MLA: [n_seq][n_ctx][R], [n_seq][n_ctx][rope] */
} kv_layer;

struct tandem_session {
    tandem_engine *e;
    int n_seq, n_ctx, n_batch;
    int *len;                   /* [n_seq] tokens in each sequence's cache */
    kv_layer *kv;               /* [n_layer] */
    /* scratch, [n_batch][...] rows */
    float *x, *h, *q, *kvbuf, *att, *ff1, *ff2, *y, *logits_row;
    float *rope_cs;             /* [n_batch][rope_dim] cos then sin */
    int32_t *tok_seq, *tok_pos;
    int32_t *ids;               /* [n_batch][k] */
    float *wts;                 /* [n_batch][k] */
    float *router_logits;       /* [n_batch][E] */
    float *route_scratch;       /* [3E] */
    int32_t *exp_count, *exp_tok; /* [E], [E][n_batch] */
    float *exp_w;               /* [E][n_batch] */
    float *gx, *gg, *gu, *gy;   /* gathered per expert: [n_batch][D], [n_batch][Fe] x2, [n_batch][D] */
    float *attn_scratch;        /* [pool threads][attn_scratch_floats] */
    int64_t attn_scratch_stride;
    float *logits;              /* [n_batch][V] */
    int n_logits;               /* logits rows filled by the last forward */
    int n_outputs;              /* capacity of logits, in rows */
    struct moe_scratch *moe_s;  /* scratch of the CPU MoE operator */
    struct hybrid_session *hys; /* GPU state of the session (runtime/hybrid.h); NULL = CPU only */
    int64_t *route_counts;      /* [n_layer][E] while tandem_count_routes is on (calib.c), else NULL */
    int64_t routed_tokens;
    struct dsa_session *dsa;    /* DSA indexer key cache and scratch (forward_dsa.c); NULL for other families */
    struct gdn_session *gdn;    /* linear-attention state per sequence (forward_gdn.c); NULL for other families */
    float *oss_scratch;         /* gpt-oss experts: [4 * max(2F, D)] (forward_oss.c); NULL for other families */
};

/* Where `tandem convert` puts a layer's packed experts, and the directory. */
void engine_packed_path(const tandem_engine *e, int fmt, int layer, char *buf, size_t n);
void engine_pack_dir(const tandem_engine *e, int fmt, char *buf, size_t n);
const char *engine_fmt_name(int fmt);

/* ---- routed experts for the CPU MoE operator (experts.c) ----------------
 * The operator of MoE layer l holding every expert x with gpu_slot[x] < 0
 * (gpu_slot NULL: all), in format fmt (TANDEM_FMT_BF16/INT8/INT4/FP8): mapped
 * from the layer's pack when the engine's packs are valid (PACK_OK), else
 * packed from the checkpoint's own dtype (BF16, F32, F16, FP8 with block
 * scales, or dummy weights), a row block at a time, with no copy of the
 * source. Afterwards the layer's checkpoint pages are released from the
 * process unless keep_source (the GPU streams them, or the reference loop
 * reads them). */
struct moe_op;
int experts_cpu_op(tandem_engine *e, int l, const int32_t *gpu_slot, int fmt, int keep_source, struct moe_op **out,
                   char *err, size_t errlen);
/* drop layer l's expert source pages from the process (no-op for dummy weights) */
void experts_release(tandem_engine *e, int l);
/* bytes one expert's three matrices (and their FP8 / INT4 scales) take in the checkpoint as stored */
int64_t experts_source_bytes(const tandem_engine *e, int l, int x);

/* ---- packs on disk (pack.c) ---------------------------------------------
 * A pack directory holds layer-N.bin per MoE layer and manifest.txt, the
 * fingerprint of what it was made from: format, partitions, architecture and
 * shapes, a hash of config.json, each shard's name, size, modification time
 * and header hash, and per MoE layer a hash of sampled bytes of every expert
 * tensor. */
enum { PACK_NONE = 0, PACK_OK = 1 };
/* Decide e->pack_state for format fmt, once the weights are bound (the
 * fingerprint samples the expert views): PACK_NONE when there is no pack (or
 * the weights are dummy, or params.ignore_packs), PACK_OK when the manifest matches this checkpoint
 * and config and every layer file is there; an error naming the file and
 * the mismatch otherwise (another model's pack, a changed checkpoint, a
 * partly written pack). */
int pack_check(tandem_engine *e, int fmt, char *err, size_t errlen);
/* write the manifest of e's checkpoint for format fmt into dir */
int pack_write_manifest(const tandem_engine *e, int fmt, const char *dir, char *err, size_t errlen);
/* 1 when dir's manifest describes e's checkpoint for fmt (message in err when not) */
int pack_manifest_matches(const tandem_engine *e, int fmt, const char *dir, char *err, size_t errlen);
int engine_load_weights(tandem_engine *e, char *err, size_t errlen);
/* ---- GGUF (load_gguf.c) ---------------------------------------------------
 * Bind specs[0..n) from e->gg: vectors and non-expert matrices dequantised to
 * F32, routed experts left as views in their GGUF type (mat.gguf_type) for
 * the MoE packer, or F32 for the reference loop. */
int engine_load_gguf_weights(tandem_engine *e, const tensor_spec *specs, int n, char *err, size_t errlen);
/* load.c's helpers, shared with load_gguf.c: where a spec's tensor goes, and
 * a buffer owned by the engine (freed with its weights) */
void engine_slot_target(tandem_engine *e, const tensor_spec *s, float ***vec, mat **m);
void *engine_own(tandem_engine *e, size_t bytes);
/* Drop [p, p + n) of the checkpoint's pages from the process (safetensors or GGUF mapping; no-op otherwise). */
void engine_release_src(const tandem_engine *e, const void *p, size_t n);
/* After engine_load_weights, F16 and FP8 matrices are still views of the
 * checkpoint (load.c). A CPU-only engine converts the non-expert ones for the
 * CPU ops (F16 -> F32, FP8 -> BF16); a hybrid one, whose GPU now holds them,
 * drops their checkpoint pages from the process instead. */
int engine_materialise_dense(tandem_engine *e, char *err, size_t errlen);
/* The routed experts as BF16/F32 matrices (F16 -> F32, FP8 and dummy -> BF16),
 * for the reference loop when it is chosen after load (TANDEM_HYBRID_CPU=ref
 * set for hybrid_engine_open alone); sets experts_materialised. */
int engine_materialise_experts(tandem_engine *e, char *err, size_t errlen);
void engine_release_dense(tandem_engine *e);
/* tandem_engine_open; with_experts = 0 binds the weights but neither packs
 * the CPU experts nor opens the GPU (`tandem convert` packs them a layer at a
 * time itself) */
int engine_open(const char *path, const tandem_engine_params *p, int with_experts, tandem_engine **out, char *err,
                size_t errlen);
void engine_free_weights(tandem_engine *e);
int forward_batch(tandem_session *s, const tandem_batch *b, char *err, size_t errlen);

/* ---- DeepSeek sparse attention (forward_dsa.c) --------------------------
 * The session's indexer key cache ([n_layer][n_seq][n_ctx][index_head_dim]
 * fp32, beside the latent cache) and scratch: made with the session, NULL
 * for other families. dsa_attention runs after MLA has written layer l's
 * latent cache rows for the batch (forward_dsa.h). */
int dsa_session_create(tandem_session *s, char *err, size_t errlen);
void dsa_session_free(tandem_session *s);
int64_t dsa_session_bytes(const tandem_session *s);
/* what dsa_session_create allocates, from the description alone (the memory plan) */
int64_t dsa_plan_bytes(const model_desc *d, int n_seq, int n_ctx, int n_batch, int n_threads);

/* ---- Gated DeltaNet / gated attention (forward_gdn.c) --------------------
 * Per linear-attention layer and sequence, the conv state (the last K-1
 * inputs of the causal conv1d) and the recurrent state (Hv matrices dk x dv),
 * fp32, made with the session (NULL for other families); the state of a
 * sequence restarts when its next token is at position 0, and cannot be
 * rewound to a shorter non-empty length (gdn_validate refuses that). */
int gdn_session_create(tandem_session *s, char *err, size_t errlen);
void gdn_session_free(tandem_session *s);
int64_t gdn_session_bytes(const tandem_session *s);
int64_t gdn_plan_bytes(const model_desc *d, int n_seq, int n_batch);
int gdn_validate(tandem_session *s, const tandem_batch *b, char *err, size_t errlen);
/* zero-centred norms (norm_offset): the loaded weights w become 1 + w, once */
void gdn_engine_prepare(tandem_engine *e);
/* Row widths of a session's per-token scratch (session.c; the memory plan
 * sizes the same buffers from them): q, the K/V (or MLA latent) rows, the
 * attention output, and the widest MLP. */
typedef struct {
    int64_t q, kv, att, ff;
} session_dims;
void session_dims_of(const model_desc *d, session_dims *out);

#endif
