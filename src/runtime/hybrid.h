/*
 * hybrid.h - GPU + CPU execution: the placement plan made at load and the
 * hybrid forward schedule (DESIGN.md section 1).
 *
 * The engine side (hybrid.c): after the CPU engine has bound its weights,
 * hybrid_engine_open() decides what lives on the GPU (everything but routed
 * experts by default, plus --gpu-experts N experts per MoE layer), checks it
 * against the memory budget, uploads it, and packs the CPU-held experts into
 * the CPU MoE operator (src/cpu/moe). e->hy stays NULL when the engine runs
 * on the CPU only (gpu = 0, or gpu = -1 without a usable device).
 *
 * The session side (hybrid_session.c, hybrid_cpu.c): the KV cache and all
 * activations in GPU memory, pinned host slots for the hand-off, and one
 * CUDA graph per decode batch shape. Per MoE layer the GPU writes the normed
 * hidden states, the expert ids (GPU-held experts masked to -1) and the
 * weights to the pinned slot; the CPU computes its experts while the GPU runs
 * the shared experts and its own experts; the GPU waits and adds the result.
 *
 * Wiring (the engine and session call these; they are no-ops when e->hy is
 * NULL): hybrid_engine_open() at the end of tandem_engine_open(),
 * hybrid_engine_close() first in tandem_engine_close(), hybrid_session_create()
 * at the end of tandem_session_create(), hybrid_session_free() first in
 * tandem_session_free(), and tandem_forward() calls hybrid_forward() instead
 * of forward_batch() when s->hys is set.
 *
 * Knobs for development and measurement, read when a session is created
 * (environment): TANDEM_GPU_GRAPH=0 disables graphs; TANDEM_GPU_HANDOFF=
 * host|memop picks the hand-off (default memop where the driver has stream
 * memory operations: sync 0.030 of a step against 0.109 for host functions,
 * bench/results/2026-11-28-h200-e2e.txt); TANDEM_GPU_CHUNK=N caps
 * tokens per GPU pass (default 1024, 4096 for a session that streams); TANDEM_GPU_EXACT=1 keeps every
 * activation fp32 (no BF16 GEMM inputs); TANDEM_GPU_FAST=0 runs the first
 * kernels instead of the decode ones (A/B timing); TANDEM_GPU_STREAM_MIN=N
 * streams the experts of passes of N tokens or more to the GPU (default
 * HY_STREAM_MIN_DEFAULT, 0 = never) and TANDEM_GPU_STREAM_SHARE=F fixes the
 * share of each layer a pass streams (hybrid_stream.c). At engine open:
 * TANDEM_HYBRID_CPU=ref computes CPU experts with the plain fp32 loop
 * instead of the MoE operator.
 *
 * Expert deferral (engine parameter defer_experts, DESIGN.md section 1) is
 * the maths of forward.c: per token the d lowest-weight experts of a MoE
 * layer followed by a MoE layer are added after the next layer. Here the CPU
 * computes layer l's deferred experts right after signalling its immediate
 * ones, while the GPU runs layer l + 1's attention and gate; the GPU adds
 * them with layer l + 1's immediate result.
 */
#ifndef TD_RUNTIME_HYBRID_H
#define TD_RUNTIME_HYBRID_H

#include <stdint.h>
#include <stdio.h>

#include "tandem.h"

struct tandem_engine;
struct tandem_session;

int hybrid_engine_open(tandem_engine *e, char *err, size_t errlen);
void hybrid_engine_close(tandem_engine *e);
int hybrid_session_create(tandem_session *s, char *err, size_t errlen);
void hybrid_session_free(tandem_session *s);
int hybrid_forward(tandem_session *s, const tandem_batch *b, char *err, size_t errlen);
void hybrid_plan_print(const tandem_engine *e, FILE *out);

/* ---- the placement plan (pure: computable and testable without a GPU) ---- */
typedef struct {
    int64_t dense_bytes;        /* GPU bytes of everything but routed experts */
    int64_t expert_bytes;       /* GPU bytes of one routed expert (gate, up, down) */
    int gpu_experts;            /* routed experts per MoE layer held on the GPU */
    int n_moe_layers;
    int64_t gpu_expert_bytes;   /* gpu_experts * expert_bytes * n_moe_layers */
    int64_t budget;             /* bytes allowed for weights */
    int64_t cpu_expert_bytes;   /* routed expert bytes left to the CPU (as stored) */
    int gpu_weights;            /* TANDEM_GPUW_* of the non-expert matrices (never AUTO) */
    int wfmt_auto;              /* gpu_weights was picked: the widest that fits (hybrid_pick_weights) */
    int64_t wfmt_bytes[5];      /* dense_bytes in each TANDEM_GPUW_* (index 0 unused) */
} hybrid_plan;

/* The widest GPU weight format whose bytes[TANDEM_GPUW_*] fit budget:
 * bf16, int8, int4 -- or fp8, int8, int4 for an FP8 checkpoint (src_fp8),
 * which fp8 holds exactly. TANDEM_EUNSUPPORTED (and *fmt = int4) when none
 * fits. cc: the compute capability x 10 (0: unknown). Pure. */
int hybrid_pick_weights(const int64_t bytes[5], int64_t budget, int src_fp8, int cc, int *fmt);
/* The TANDEM_GPUW_* an engine's GPU holds its non-expert matrices in (0 without a GPU side). */
int hybrid_gpu_weights(const tandem_engine *e);

/* Plan the weights of e for a budget in bytes. Fails with a message naming
 * the sizes when the non-expert weights do not fit, or when gpu_experts is
 * out of range or does not fit beside them. */
int hybrid_plan_make(const tandem_engine *e, int64_t budget, hybrid_plan *p, char *err, size_t errlen);

/* Session options; hybrid_session_create() takes them from the environment. */
enum { HY_HANDOFF_HOST = 0, HY_HANDOFF_MEMOP = 1 };
typedef struct {
    int graphs;                 /* capture one CUDA graph per decode shape */
    int handoff;                /* HY_HANDOFF_* */
    int chunk;                  /* most tokens per GPU pass */
    int exact;                  /* fp32 GEMM inputs everywhere */
    int fast;                   /* decode kernels (gpu_ctx_set_fast); 0 = the first kernels, for A/B */
    int defer;                  /* expert deferral d; -1 = the engine's defer_experts */
    int cpu_skip;               /* measurement: hand off, but the CPU computes nothing */
    int no_handoff;             /* measurement: skip CPU experts entirely (GPU time alone) */
    int stream_min;             /* passes of at least this many tokens copy each MoE layer's experts to the GPU and
                                   run them there instead of on the CPU (hybrid_stream.c); 0 = never */
    double stream_share;        /* share of a layer's experts such a pass streams, the rest going to the CPU at the
                                   same time; < 0 = the share that balances the two, from the copy and CPU times
                                   measured at session creation (TANDEM_GPU_STREAM_SHARE) */
} hybrid_opts;
/* The default stream_min (environment TANDEM_GPU_STREAM_MIN; 0 turns streaming off). On the H200, Qwen3-30B-A3B
 * with INT4 CPU experts, a layer's copy (22 ms at 54 GB/s) alone beats the CPU from about 550 tokens; a pass that
 * splits the experts between the copy and the CPU (passes under HY_SPLIT_MAX_T tokens) was 1.5x faster than the
 * CPU alone at 256 tokens, 1.6x at 512, 2.1x at 1024. */
enum { HY_STREAM_MIN_DEFAULT = 256, HY_SPLIT_MAX_T = 2048 };
void hybrid_opts_default(hybrid_opts *o);   /* defaults, then the environment */
/* Whether e's experts can be streamed at all: the copy reads BF16/F32 experts
 * from the checkpoint's own pages; a BF16 copy of FP8, F16 or dummy experts
 * would be a second resident copy of every expert, which the load path never
 * makes, so such models do not stream (until the GPU reads the packs). */
int hybrid_stream_source_ok(const tandem_engine *e);
int hybrid_session_create_opts(tandem_session *s, const hybrid_opts *o, char *err, size_t errlen);
/* Change graphs / exact / cpu_skip / no_handoff of a live session (drops its
 * graphs); the hand-off mechanism, chunk and stream_min are fixed at creation. */
void hybrid_session_set_opts(tandem_session *s, const hybrid_opts *o);

/* Accumulated time of the session (nanoseconds) since the last reset. */
typedef struct {
    int64_t steps, graph_launches, captures;
    int64_t cpu_ns;             /* inside the CPU experts */
    int64_t cpu_def_ns;         /* of which deferred experts (overlapping the next layer's GPU work) */
    int64_t wall_ns;            /* inside hybrid_forward */
} hybrid_stats;
void hybrid_stats_get(const tandem_session *s, hybrid_stats *out);
void hybrid_stats_reset(tandem_session *s);

#endif
