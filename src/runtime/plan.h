/*
 * plan.h - the memory plan: what a run needs, host and GPU, item by item,
 * computed from the model description without allocating any weight
 * (DESIGN.md section 6).
 *
 * The plan mirrors what the engine allocates: routed experts packed for the
 * CPU MoE operator (moe_packed_expert_bytes), non-expert matrices used in
 * place from the mmap'd safetensors when BF16/F32 (file pages, counted as
 * host bytes because every token reads them) or converted at load (F16 ->
 * F32, FP8 -> BF16; vectors -> F32), the session's KV cache and scratch as
 * session.c sizes them, and with a GPU what hybrid.c / hybrid_session.c /
 * hybrid_stream.c upload and allocate. Where a size here restates a rule of
 * another file, the comment names that file: a change there must change it
 * here too (test_plan compares the two on every fixture).
 *
 * The checks: tandem_engine_open() checks the engine's host part right
 * after config.json is read (plan_check_engine), tandem_session_create()
 * the session's part (plan_check_session); both fail with TANDEM_ENOMEM and
 * one message that names what is needed, what is there, the biggest items
 * and an option that would fit.
 */
#ifndef TD_RUNTIME_PLAN_H
#define TD_RUNTIME_PLAN_H

#include <stdint.h>

#include "io/safetensors.h"
#include "model/model.h"
#include "tandem.h"

struct tandem_engine;
struct tandem_session;

typedef struct {
    int cpu_experts;        /* TANDEM_FMT_* */
    int n_threads, n_parts; /* CPU pool: threads, NUMA partitions (resolved, >= 1) */
    int isa;                /* ISA_* of core/isa.h (the tile kernels' scratch) */
    int gpu;                /* 1: the hybrid plan (GPU + CPU) */
    int gpu_experts;        /* routed experts per MoE layer on the GPU (hybrid) */
    int gpu_weights;        /* TANDEM_GPUW_* of the non-expert GPU matrices; AUTO: the widest that fits gpu_budget */
    int64_t gpu_budget;     /* GPU bytes for weights (--gpu-mem); 0 = not known */
    int defer;              /* expert deferral d (sizes a few hybrid buffers) */
    int dummy;              /* dummy weights: generated where they are read, nothing read from files */
    int dummy_bf16;         /* dummy weights with dummy_bf16_experts: the experts as BF16 buffers too */
    int n_ctx, n_seq, n_batch, n_outputs; /* session (resolved as session.c does) */
} plan_opts;

/* Fill o from engine and session parameters as tandem_engine_open() and
 * tandem_session_create() resolve them (threads 0 = online cores, n_ctx 0 =
 * min(model max, 4096) ...). gpu: 1 for the hybrid plan. */
void plan_opts_from(plan_opts *o, const model_desc *d, const tandem_engine_params *ep,
                    const tandem_session_params *sp, int gpu);

/* The plan of d under o. st: the checkpoint's headers (dtypes of every
 * tensor), or NULL to take the dtypes from config.json (torch_dtype, and
 * quantization_config through d->fp8); cfg_path: that config.json (for
 * torch_dtype; NULL = bfloat16). Allocates nothing beyond a few KB. */
int plan_make(const model_desc *d, const st_set *st, const char *cfg_path, const plan_opts *o, tandem_plan *out,
              char *err, size_t errlen);

/* Check the counted items of `part` (TANDEM_PLAN_ENGINE, TANDEM_PLAN_SESSION,
 * or -1 for both) against host_avail / gpu_avail bytes (gpu_avail <= 0: the
 * GPU is not checked). avail_what says where host_avail came from, for the
 * message ("MemAvailable", "--host-mem"). TANDEM_ENOMEM with one message. */
int plan_check(const tandem_plan *p, int part, int64_t host_avail, int64_t gpu_avail, const char *avail_what,
               char *err, size_t errlen);

/* Bytes of host memory there for a run: MemAvailable of /proc/meminfo, or -1. */
int64_t plan_mem_available(void);

/* The checks wired into tandem_engine_open() (after config.json and the
 * layer limit) and tandem_session_create() (before its first allocation). */
int plan_check_engine(const struct tandem_engine *e, char *err, size_t errlen);
int plan_check_session(const struct tandem_engine *e, const tandem_session_params *p, char *err, size_t errlen);

/* Defined in session.c: the bytes of host memory a session holds in the
 * buffers session.c allocates (KV cache, scratch, logits), as the allocator
 * reports them. Not the CPU MoE operator's scratch (moe.h gives no size for
 * it) nor the GPU side. For checking the plan against. */
int64_t session_host_bytes(const struct tandem_session *s);

#endif
