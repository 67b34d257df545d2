/*
 * tandem_moe.h - tandem's CPU Mixture-of-Experts operator on its own, for
 * engines that keep the rest of the model themselves (SGLang's CPU-expert
 * hook, a Python host through the `tandem` package, another C engine).
 *
 *   out[t][:] = sum_k w[t][k] * E_{ids[t][k]}(x[t]),   E(x) = down(silu(gate x) * (up x))
 *
 * Who owns what:
 *   - A tandem_moe is one MoE layer: its routed experts packed once at
 *     creation (copied out of the caller's weights, which may be freed as
 *     soon as tandem_moe_create returns), its own thread pool, and scratch
 *     sized for params.max_tokens, so a call allocates nothing. One call at a
 *     time per operator; operators of several layers may share the machine
 *     (their pools take turns only if the caller serialises them).
 *   - Arrays of a batch (x, ids, weights, out) stay the caller's. After
 *     tandem_moe_submit they must stay valid and untouched until
 *     tandem_moe_sync returns: the work runs on the operator's threads while
 *     the caller does something else (the GPU's experts, say). Inputs are
 *     read in place (zero copy) unless deferral needs them rearranged.
 *
 * Masks: an expert is computed here only if it is held (params.held, or the
 * experts a pack holds). A routed id < 0 or of an expert not held is skipped,
 * so a host that keeps some experts on the GPU passes the full top-k ids.
 * An id >= n_expert is an error (TANDEM_EINVAL at submit).
 *
 * Deferral (DESIGN.md section 1): with batch.n_deferred = d > 0, each
 * token's d routed experts of lowest weight among those held here are
 * summed into out_deferred instead of out, for the host to add one layer
 * later. d = 0 is the exact layer.
 *
 * Numerics per format are those of src/cpu/moe/moe.h (BF16 activations;
 * INT8 / INT4 weights and activations quantised per row; FP8 E4M3 weights
 * with a scale per row and 128 columns). The library reads no environment
 * variable for this operator: everything it can be told is a parameter.
 */
#ifndef TANDEM_MOE_H
#define TANDEM_MOE_H

#include "tandem.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tandem_moe tandem_moe;

/* packed formats the kernels read */
enum { TANDEM_MOE_BF16 = 0, TANDEM_MOE_INT8 = 1, TANDEM_MOE_INT4 = 2, TANDEM_MOE_FP8 = 3 };
/* element types of weights and activations handed in */
enum { TANDEM_DT_BF16 = 0, TANDEM_DT_F32 = 1, TANDEM_DT_F16 = 2, TANDEM_DT_FP8 = 3 };
/* kernel sets; AUTO = the best this CPU has */
enum { TANDEM_ISA_AUTO = -1, TANDEM_ISA_REF = 0, TANDEM_ISA_AVX2 = 1, TANDEM_ISA_AVX512 = 2, TANDEM_ISA_AMX = 3 };

typedef struct {
    int n_expert, d_model, d_ff; /* experts of the layer, hidden size, expert intermediate size */
    int top_k;                   /* most ids per token a batch passes */
    int max_tokens;              /* most tokens of one batch */
    int max_deferred;            /* most deferred experts per token a batch asks for (0: no deferral;
                                    > 0 doubles the scratch) */
    int format;                  /* TANDEM_MOE_*: the packed format (weights are quantised to it) */
    int src_dtype;               /* TANDEM_DT_* of the weights below (FP8: E4M3 with block scales) */
    /* Weights in Hugging Face layout, either stacked (one pointer each) ... */
    const void *gate;            /* [n_expert][d_ff][d_model] */
    const void *up;              /* [n_expert][d_ff][d_model] */
    const void *down;            /* [n_expert][d_model][d_ff] */
    /* ... or one pointer per expert (used when gate_ptrs is not NULL; a NULL
       entry is an expert not held here, and needs no weights) */
    const void *const *gate_ptrs, *const *up_ptrs, *const *down_ptrs; /* [n_expert] */
    /* TANDEM_DT_FP8 only: fp32 block scales of block_n rows x block_k columns
       (DeepSeek's weight_scale_inv), stacked [n_expert][ceil(rows/bn)][ceil(cols/bk)] */
    const float *gate_scale, *up_scale, *down_scale;
    int block_n, block_k;
    const uint8_t *held;         /* [n_expert]: nonzero = computed here; NULL = all (or all with weights) */
    int n_threads;               /* CPU threads of the operator's pool; 0 = one per core */
    int n_numa;                  /* NUMA partitions (each holds a slice of every expert); 0 = one per node */
    int isa;                     /* TANDEM_ISA_*; a set this CPU lacks is TANDEM_EUNSUPPORTED */
    int int8_group;              /* INT8: scale group along K (multiple of 64); 0 = one scale per row */
    int amx_min;                 /* tokens per expert from which the AMX tile kernel runs; 0 = per format */
    const char *tune;            /* tile-kernel and schedule settings, "i4=0,mc=256" (the keys of `tandem
                                    bench moe --tune`; i4=0: exact INT4 on AMX); NULL = defaults */
} tandem_moe_params;

void tandem_moe_params_default(tandem_moe_params *p);

/* Pack (and quantise) the experts described by p, in parallel on a new pool. */
int tandem_moe_create(const tandem_moe_params *p, tandem_moe **out, char *err, size_t errlen);
/* From a pack file (tandem_moe_save, or one layer of `tandem convert`'s
 * packed-FMT-pN/ directory): p gives threads, NUMA partitions (they must match
 * the pack's), isa, top_k, max_tokens, max_deferred and held; its shape,
 * format and weights are ignored (the file's are used). */
int tandem_moe_open(const char *path, const tandem_moe_params *p, tandem_moe **out, char *err, size_t errlen);
int tandem_moe_save(const tandem_moe *m, const char *path, char *err, size_t errlen);
void tandem_moe_free(tandem_moe *m);

typedef struct {
    int n_expert, d_model, d_ff, format;
    int n_held;                  /* experts computed here */
    int isa;                     /* kernel set in use */
    int n_threads, n_numa;
    int top_k, max_tokens, max_deferred;
    int64_t expert_bytes;        /* packed bytes of one expert */
} tandem_moe_info;
void tandem_moe_get_info(const tandem_moe *m, tandem_moe_info *out);
/* nonzero when expert e is computed here */
int tandem_moe_holds(const tandem_moe *m, int e);
/* Change which experts are computed here (a subset of those packed: an
 * expert that has no packed weights stays skipped); held NULL = all packed.
 * Not while a batch is in flight. */
int tandem_moe_set_held(tandem_moe *m, const uint8_t *held, char *err, size_t errlen);

typedef struct {
    int n_tokens;                /* <= max_tokens */
    int top_k;                   /* ids per token in ids / weights, <= params top_k */
    const int32_t *ids;          /* [n_tokens][top_k] expert ids; < 0 or not held: skipped */
    const float *weights;        /* [n_tokens][top_k] routing weights */
    const void *x;               /* [n_tokens][d_model] activations */
    int x_dtype;                 /* TANDEM_DT_BF16 or TANDEM_DT_F32 */
    float *out;                  /* [n_tokens][d_model] fp32, overwritten */
    int n_deferred;              /* 0..max_deferred: per token, the experts of lowest weight summed into out_deferred */
    float *out_deferred;         /* [n_tokens][d_model] fp32, overwritten; needed when n_deferred > 0 */
} tandem_moe_batch;

/* Run one batch on the calling thread (with the pool), returning when out is final. */
int tandem_moe_forward(tandem_moe *m, const tandem_moe_batch *b, char *err, size_t errlen);
/* Start one batch on the operator's own driver thread and return at once
 * (arguments are checked here: a bad batch fails now and nothing runs);
 * tandem_moe_sync waits for it and returns its result. A second submit before
 * the sync is TANDEM_EINVAL. */
int tandem_moe_submit(tandem_moe *m, const tandem_moe_batch *b, char *err, size_t errlen);
int tandem_moe_sync(tandem_moe *m, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
