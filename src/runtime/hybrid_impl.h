/*
 * hybrid_impl.h - the insides of the hybrid engine and session, shared by
 * hybrid.c (plan, upload), hybrid_session.c (schedule, graphs) and
 * hybrid_cpu.c (the CPU side of the hand-off). Not for other modules.
 *
 * Invariants: every device pointer below was made by hybrid.c / the session
 * and is freed by them; shapes are in the comments; activations on the GPU
 * are fp32 rows of [chunk][...]. The pinned hand-off slot of layer l is
 * slot parity p = l & 1: the GPU writes it before the layer's hand-off and
 * reads the immediate result only after the CPU signalled. With deferral the
 * CPU still reads layer l's slot (and writes its deferred result ydef[p])
 * while the GPU runs layer l + 1 and writes slot 1 - p; the GPU reads
 * ydef[p] only after the CPU signalled layer l + 1 (which it does after
 * finishing layer l's deferred experts), and writes slot p again only after
 * that, so two slots serve every layer. The immediate result y has one
 * buffer: the CPU writes it only between a layer's go and done.
 */
#ifndef TD_RUNTIME_HYBRID_IMPL_H
#define TD_RUNTIME_HYBRID_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "cpu/moe/moe.h"
#include "cuda/gpu.h"
#include "runtime/engine.h"
#include "runtime/hybrid.h"

typedef struct {
    float *attn_norm, *ffn_norm;          /* [D] */
    /* GQA: q, k, v fused */
    gpu_mat qkv;                          /* [qd + 2kd][D] */
    float *qkv_bias;                      /* [qd + 2kd] or NULL */
    float *q_norm, *k_norm;               /* [head_dim] or NULL */
    /* MLA: q_a and kv_a fused (both read h) */
    gpu_mat qkv_a;                        /* [rq + R + rope][D] (rq = 0 without q_lora) */
    gpu_mat q_b;                          /* [H*qk][rq], or q [H*qk][D] without q_lora */
    gpu_mat kv_b;                         /* [H*(nope+v)][R] */
    float *q_a_norm, *kv_a_norm;          /* [rq], [R] */
    gpu_mat o;                            /* [D][H*v] */
    float *o_bias;                        /* [D] or NULL */
    /* dense MLP */
    gpu_mat ffn_gu, ffn_down;             /* [2F][D], [D][F] */
    float *ffn_gu_bias, *ffn_down_bias;
    /* MoE */
    gpu_mat router;                       /* [E][D] */
    float *router_bias;                   /* [E] or NULL */
    gpu_mat sh_gu, sh_down;               /* [2Fs][D], [D][Fs] */
    float *sh_gu_bias, *sh_down_bias;
    gpu_mat sh_gate_inp;                  /* [1][D] (Qwen2-MoE) */
    gpu_experts ex;                       /* GPU-held routed experts */
    int n_gpu_exp;
    int32_t *slot_host;                   /* [E] place on the GPU or -1 */
    moe_op *moe;                          /* CPU-held experts (NULL with the reference loop) */
    int moe_borrowed;                     /* moe belongs to the engine (e->moe), not freed here */
} hy_layer;

typedef struct hybrid_engine {
    int device;
    const struct st_set *st;              /* the checkpoint, whose pages each upload drops once on the GPU
                                             (NULL with dummy weights) */
    gpu_info info;
    hybrid_plan plan;
    pool *pool;                           /* the engine's threads: quantising weights at upload */
    int cpu_ref;                          /* CPU experts by the plain loop, not the MoE operator */
    int moe_fmt;                          /* MOE_* of the CPU experts */
    gpu_mat embed, lm_head;               /* [V][D] */
    float *out_norm;                      /* [D] */
    float *inv_freq;                      /* [rope_dim/2] */
    hy_layer *L;                          /* [n_layer] */
    void **bufs;                          /* every device allocation */
    int n_bufs, cap_bufs;
    int64_t gpu_bytes;                    /* weights uploaded */
    double upload_s, pack_s;
    /* hot experts: which gpu_experts of each layer the GPU keeps */
    int64_t *hot_counts;                  /* [n_layer][E] routing counts, or NULL: experts 0..n-1 */
    int64_t hot_tokens;                   /* tokens behind hot_counts */
    char hot_src[1100];                   /* the counts file, for `tandem info` */
    /* expert streaming: the routed experts' host memory, page-locked once for the copy engine */
    int pin_state;                        /* 0 not tried, 1 pinned, -1 could not */
    void **pins;                          /* [n_pins] registered ranges */
    int n_pins;
    /* what a split pass balances, measured by the first session that needs them (0: not yet) */
    double stream_copy_ms;                /* one layer's experts over PCIe */
    double stream_pair_us;                /* the CPU operator per (token, expert) pair */
} hybrid_engine;

enum { HY_MAX_GRAPHS = 16 };
enum { HY_ONE_CALL_T = 64 }; /* passes up to this many tokens: one CPU call per deferring layer */

typedef struct hybrid_session hybrid_session;

typedef struct {
    hybrid_session *hs;
    int layer;
    int deferred;                         /* the layer's deferred experts, not its immediate ones */
} hy_job;

struct hybrid_session {
    tandem_session *s;
    tandem_engine *e;
    hybrid_engine *hy;
    hybrid_opts o;
    gpu_ctx *c;
    int chunk;                            /* most tokens per pass */
    int n_out;                            /* logits rows per pass */
    /* KV cache on the GPU */
    float *kv;                            /* one block for all layers */
    float **k, **v;                       /* GQA [n_layer] -> [n_seq][n_ctx][kd] */
    float **ckv, **kpe;                   /* MLA [n_layer] -> [n_seq][n_ctx][R], [..][rope] */
    /* device activations */
    float *x, *h;                         /* [chunk][D] residual stream, normed input */
    float *qkv;                           /* GQA [chunk][qd+2kd]; MLA [chunk][rq+R+rope] */
    float *q;                             /* MLA [chunk][H*qk] */
    float *att;                           /* [chunk][H*v] */
    float *ff, *act;                      /* [chunk][2F], [chunk][F] (F the largest FFN) */
    float *ysh;                           /* [chunk][D] gated shared expert */
    float *rlog;                          /* [chunk][E] router logits */
    float *wts;                           /* [chunk][K] */
    float *shg;                           /* [chunk] shared-expert gate logits */
    float *xw;                            /* [n_out][D] wanted rows */
    float *logits;                        /* [n_out][V] */
    float *scratch;                       /* MLA: 2*chunk*H*R; GPU experts: chunk*K*(3Fe+D) */
    int32_t *ids;                         /* [chunk][K] */
    int32_t *gids, *gids_def;             /* [chunk][K] immediate / deferred ids for the GPU-held experts */
    float *ydg[2];                        /* [chunk][D] deferred output of the GPU-held experts, by parity */
    int32_t *tok_d, *pos_d, *seq_d, *rows_d;
    /* pinned host memory (mapped: kernels read and write the slot directly) */
    int32_t *tok_h, *pos_h, *seq_h, *rows_h;   /* [chunk] inputs of one pass */
    void *slot_x[2];                      /* [chunk][D] fp32 (or bf16) hidden states to the CPU, by parity */
    int32_t *slot_ids[2];                 /* [chunk][K] immediate CPU experts (-1 elsewhere) */
    int32_t *slot_ids_def[2];             /* [chunk][K] deferred CPU experts (-1 elsewhere) */
    float *slot_w[2];                     /* [chunk][K] */
    float *slot_y;                        /* [chunk][D] CPU result, immediate experts */
    float *slot_ydef[2];                  /* [chunk][D] CPU result, deferred experts, by parity */
    uint32_t *flags;                      /* [n_layer][2]: go, done (hand-off b) */
    int defer;                            /* d of expert deferral (0 = exact) */
    unsigned char *defers;                /* [n_layer] layer l defers d experts to layer l + 1 */
    int logits_pinned;                    /* s->logits is registered with CUDA */
    /* CPU side */
    moe_scratch *ms;                      /* MoE operator scratch */
    /* a deferring layer's immediate and deferred experts in one call (hybrid_cpu.c, T <= HY_ONE_CALL_T):
     * rows [0, T) immediate, [T, 2T) deferred */
    moe_scratch *ms2;                     /* for 2 * HY_ONE_CALL_T tokens */
    uint16_t *x2;                         /* [2][HY_ONE_CALL_T][D] */
    int32_t *ids2;                        /* [2][HY_ONE_CALL_T][K] */
    float *w2, *y2;                       /* [2][HY_ONE_CALL_T][K], [2][HY_ONE_CALL_T][D] */
    /* expert streaming (hybrid_stream.c) */
    int stream_ready;                     /* staging allocated: passes of o.stream_min tokens or more stream */
    int streaming;                        /* the pass in flight streams */
    void *stream_gu[2], *stream_dn[2];    /* staging areas: [E][2F][D], [E][D][F] as stored */
    int stream_bufs;                      /* 2: the next layer's copy overlaps (side stream); 1: copy, then use */
    int stream_cur;                       /* the area the next streamed layer uses */
    gpu_dtype stream_dt;
    size_t stream_row;                    /* bytes of one [F][D] matrix */
    /* a split pass streams the first stream_n experts and hands the rest to the CPU, both at once */
    int stream_n;                         /* experts the pass in flight streams (n_expert: all of them) */
    int stream_can_split;                 /* the CPU holds every expert (no GPU-held ones), and the share is fixed
                                             or the engine's stream_copy_ms / stream_pair_us are measured */
    int32_t *stream_slot;                 /* device [E]: x -> x for x < stream_slot_n, else -1 */
    int stream_slot_n;
    float *rx, *rg, *ru, *ry;             /* reference loop: [chunk][D], [chunk][F] x2, [chunk][D] */
    int32_t *r_cnt, *r_tok;               /* [E], [E][chunk] */
    float *r_w;                           /* [E][chunk] */
    hy_job *jobs;                         /* [n_layer][2]: immediate, deferred */
    int cur_T;                            /* tokens of the pass in flight */
    _Atomic int64_t cpu_ns;
    _Atomic int64_t cpu_def_ns;           /* the deferred experts' share of cpu_ns */
    int cpu_rc;
    char cpu_msg[256];
    /* hand-off (b): the thread that watches the flags */
    pthread_t th;
    int th_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int armed, quit;
    atomic_int abort_step;
    /* graphs, keyed by (tokens, wanted rows) */
    struct {
        int T, n_want;
        gpu_graph *g;
    } graphs[HY_MAX_GRAPHS];
    int n_graphs;
    hybrid_stats st;
    void **bufs;                          /* every device allocation of the session */
    int n_bufs, cap_bufs;
    float *logits_h;                      /* pinned staging when s->logits cannot be pinned */
};

/* hybrid.c: the scale group of matrices fused into one under --gpu-weights fmt (TANDEM_GPUW_*) */
int hy_wq_group(const mat *const *parts, int n, int fmt);
/* and the format of the embedding table and lm_head under fmt: int8 for int4; as stored (BF16) for fp8 of an FP8
 * checkpoint (src_fp8), which stores them so (fp8 then rounds nothing); else fmt */
static inline int hy_head_fmt(int fmt, int src_fp8)
{
    return fmt == TANDEM_GPUW_INT4 ? TANDEM_GPUW_INT8 : fmt == TANDEM_GPUW_FP8 && src_fp8 ? TANDEM_GPUW_BF16 : fmt;
}

/* hybrid_cpu.c */
int hy_cpu_init(hybrid_session *hs, char *err, size_t errlen);
void hy_cpu_free(hybrid_session *hs);
void hy_cpu_layer(void *job);             /* host function: the CPU experts of one hy_job */
int hy_cpu_arm(hybrid_session *hs);       /* hand-off (b): watch the flags of one pass */
void hy_cpu_disarm(hybrid_session *hs, int aborted);
int hy_layer_has_cpu(const hybrid_engine *hy, const model_desc *d, int l);

/* hybrid_ops.c: per-op GPU timings of one layer (bench e2e --ops), and the
 * node counts of the session's graph for passes of T tokens. */
int hybrid_bench_ops(tandem_session *s, const char *model, int T, char *err, size_t errlen);
int hybrid_graph_counts(const tandem_session *s, int T, gpu_graph_counts *out);
/* hybrid_stream.c */
int hy_stream_usable(hybrid_session *hs);
int hy_stream_init(hybrid_session *hs, char *err, size_t errlen);
void hy_stream_free(hybrid_session *hs);
int hy_stream_plan(hybrid_session *hs, int T);
void hy_stream_begin(hybrid_session *hs);
void hy_stream_layer(hybrid_session *hs, int l, gpu_experts *out);
void hy_stream_unpin(hybrid_engine *hy);
/* `bench e2e --pcie` (hybrid_pcie.c): one MoE layer's experts streamed to the
 * GPU and run there vs the CPU operator, on T tokens; prints one line. */
int hybrid_bench_pcie(tandem_engine *e, const char *name, int T, char *err, size_t errlen);

static inline int64_t hy_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#endif
