/*
 * gpu.h - the CUDA backend behind a plain C header.
 *
 * C files include only this header; the functions are `extern "C"` entries
 * of the .cu files in this folder (one op family per file: gpu_core.cu for
 * devices, memory, streams, hand-off and graphs; gpu_gemm.cu; gpu_elem.cu for
 * embedding, norms, rope and row arithmetic; gpu_attn.cu; gpu_router.cu;
 * gpu_moe.cu). A build without CUDA links gpu_none.c instead, where every
 * function reports "built without CUDA" and gpu_device_count() is 0.
 *
 * Pointers: device memory is a plain pointer from gpu_alloc(); host memory
 * that the GPU reads or writes asynchronously (copies, flags) must come from
 * gpu_host_alloc() (pinned, mapped; the same address on both sides).
 *
 * A gpu_ctx is one timeline of work: a main stream, a side stream for the
 * CPU hand-off, a cuBLAS handle with its own workspace and a bf16 scratch
 * for GEMM inputs. It belongs to one session and one thread at a time. Ops
 * only enqueue work; errors are sticky: the first failure (a bad launch, a
 * CUDA or cuBLAS error) is kept with its message, later ops on the context
 * return it without enqueueing anything, and gpu_ctx_status() reports it
 * once a sequence of ops is enqueued. Every op returns that status (0 ok or
 * TANDEM_EGPU), so callers may also stop early.
 *
 * Numerics (what the CPU reference is compared against):
 *   - activations are fp32 everywhere between ops; all sums are fp32;
 *   - weights live on the GPU in their checkpoint dtype (BF16, or F32), or
 *     quantised (INT8, INT4, FP8 with group scales: gpu_dtype);
 *   - gpu_matmul with T <= exact_max_T (default 16, the decode sizes) runs
 *     our own kernel: fp32 activations x BF16/F32 weights, fp32 sums, so it
 *     differs from the CPU only by summation order (T <= 16: the split-K
 *     decode GEMV of gpu_gemv.cuh; more tokens: one warp per row); above
 *     exact_max_T it is cuBLAS
 *     with activations rounded to BF16 (round to nearest even) and fp32
 *     accumulation for BF16 weights (relative error ~2^-9 per product), and
 *     plain fp32 GEMM for F32 weights. gpu_ctx_set_exact() moves the limit.
 *   - exponentials, softmax and the router follow src/cpu exactly in
 *     formula (fp32 expf, max subtracted, sums of probabilities in double).
 */
#ifndef TD_CUDA_GPU_H
#define TD_CUDA_GPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- devices --------------------------------------------------------------- */
typedef struct {
    char name[256];
    int cc_major, cc_minor, n_sm;
    size_t mem_total, mem_free;   /* bytes, when opened */
    int driver_version;           /* e.g. 13000; 0 = no driver */
    int runtime_version;          /* of the CUDA runtime linked in */
    int mem_ops;                  /* stream memory operations usable (hand-off b) */
    int cublas;                   /* libcublas found (else every GEMM runs our kernel) */
} gpu_info;

/* How many CUDA devices this process can use; 0 when there is no driver or
 * no device, with the reason in why[whylen] (may be NULL). Never fails. */
int gpu_device_count(char *why, size_t whylen);
/* Make `device` current for the calling thread and describe it. */
int gpu_open(int device, gpu_info *info, char *err, size_t errlen);
/* Make `device` current for the calling thread (cheap; each thread that
 * enqueues work calls it once). */
int gpu_use_device(int device, char *err, size_t errlen);
/* Free and total memory of the current device. */
int gpu_mem_info(size_t *free_bytes, size_t *total_bytes, char *err, size_t errlen);

/* ---- memory ---------------------------------------------------------------- */
int gpu_alloc(void **p, size_t bytes, char *err, size_t errlen);
void gpu_free(void *p);                                   /* NULL ok */
int gpu_host_alloc(void **p, size_t bytes, char *err, size_t errlen); /* pinned, mapped, zeroed */
void gpu_host_free(void *p);                              /* NULL ok */
/* Pin an existing host buffer (so async copies and graphs may target it);
 * read-only mappings are pinned read-only. */
int gpu_host_register(void *p, size_t bytes, char *err, size_t errlen);
void gpu_host_unregister(void *p);                        /* NULL ok */
/* Synchronous copies (any host memory); for load time and tests. They do
 * not wait for contexts' streams: gpu_sync() a context before downloading
 * what it computed. */
int gpu_upload(void *dst, const void *src, size_t bytes, char *err, size_t errlen);
int gpu_download(void *dst, const void *src, size_t bytes, char *err, size_t errlen);
int gpu_memset(void *dst, int value, size_t bytes, char *err, size_t errlen);

/* ---- contexts: streams, hand-off, graphs ----------------------------------- */
typedef struct gpu_ctx gpu_ctx;
enum { GPU_MAIN = 0, GPU_SIDE = 1 };

/* scratch_elems: the largest T * K of any gpu_matmul that may take the
 * cuBLAS path (its input is rounded to BF16 there). */
int gpu_ctx_create(gpu_ctx **out, size_t scratch_elems, char *err, size_t errlen);
void gpu_ctx_free(gpu_ctx *c);                            /* NULL ok */
/* The sticky status: 0, or the first error with its message. */
int gpu_ctx_status(const gpu_ctx *c, char *err, size_t errlen);
/* Forget the sticky error. Only for a failed graph capture, which leaves
 * the context usable (the caller then runs without graphs). */
void gpu_ctx_clear(gpu_ctx *c);
/* Wait for both streams, then report the status. */
int gpu_sync(gpu_ctx *c, char *err, size_t errlen);
/* gpu_matmul uses its own fp32-activation kernel for T <= max_T. */
void gpu_ctx_set_exact(gpu_ctx *c, int max_T);
/* A BF16 scratch of `elems` for the prefill path of quantised weights
 * (row tiles dequantised before cuBLAS); before any capture. Without it a
 * quantised GEMM above exact_max_T tokens runs the decode kernels' path. */
int gpu_ctx_reserve_dequant(gpu_ctx *c, size_t elems, char *err, size_t errlen);
#define GPU_DEQUANT_ELEMS (16ll << 20)   /* 32 MB: what a session reserves */
/* fast = 1 (default): the decode kernels (split-K GEMV, split-KV attention,
 * one-warp router, fused gate / add+norm / q,k prep); 0: the first kernels
 * of each op and the fused ops as their separate kernels, for A/B timing.
 * Both compute the same function (tests/test_gpu_fast.c checks both). */
void gpu_ctx_set_fast(gpu_ctx *c, int fast);

/* Timing with device events on the main stream (benchmarks). */
typedef struct gpu_timer gpu_timer;
int gpu_timer_create(gpu_timer **out, char *err, size_t errlen);
void gpu_timer_free(gpu_timer *t);                        /* NULL ok */
int gpu_timer_start(gpu_ctx *c, gpu_timer *t);
int gpu_timer_stop(gpu_ctx *c, gpu_timer *t);
/* Milliseconds between start and stop (waits for stop). */
int gpu_timer_ms(gpu_ctx *c, gpu_timer *t, double *ms);

/* Asynchronous copy on a stream; host memory must be pinned. */
int gpu_copy(gpu_ctx *c, int stream, void *dst, const void *src, size_t bytes);
int gpu_zero(gpu_ctx *c, int stream, void *dst, size_t bytes);
int gpu_fork(gpu_ctx *c);   /* the side stream waits for the main stream's work so far */
int gpu_join(gpu_ctx *c);   /* the main stream waits for the side stream's work so far */

/* Hand-off (a): run fn(arg) on a CUDA host thread when the stream reaches
 * this point; the stream waits until fn returns. fn must not call CUDA. */
int gpu_host_fn(gpu_ctx *c, int stream, void (*fn)(void *), void *arg);
/* Hand-off (b): stream memory operations on 32-bit flags in pinned memory.
 * write: *flag = value once earlier work on the stream is done (with a
 * memory fence). wait: the stream waits until *flag == value. */
int gpu_flag_write(gpu_ctx *c, int stream, uint32_t *flag, uint32_t value);
int gpu_flag_wait(gpu_ctx *c, int stream, uint32_t *flag, uint32_t value);

/* CUDA graphs: everything enqueued between begin and end on the context's
 * streams (which must re-join the main stream) is captured, not run. */
typedef struct gpu_graph gpu_graph;
int gpu_capture_begin(gpu_ctx *c);
int gpu_capture_end(gpu_ctx *c, gpu_graph **out);
int gpu_graph_launch(gpu_ctx *c, gpu_graph *g);
void gpu_graph_free(gpu_graph *g);                        /* NULL ok */
/* Nodes of a captured graph: kernels, memory operations (copies, memsets,
 * stream memory ops), host functions, and all nodes. */
typedef struct {
    int kernels, mem, host, total;
} gpu_graph_counts;
int gpu_graph_count(const gpu_graph *g, gpu_graph_counts *out);

/* ---- ops (enqueued on the main stream) --------------------------------------- */
/* Weight formats. BF16 and F32 as the checkpoint stores them; the others are
 * the quantised non-expert weights of --gpu-weights (gpu_quant.h makes them
 * on the host and is the reference the kernels are tested against), each
 * weight-only (activations stay fp32 / BF16), with one fp32 scale per
 * `group` columns of a row, w = q * scale:
 *   GPU_INT8  int8_t q in [-127, 127];
 *   GPU_INT4  two per byte, column 2j in the low nibble, q = nibble - 8 in [-8, 7];
 *   GPU_FP8   E4M3 (e4m3fn, max 448); a DeepSeek FP8 checkpoint's bytes as
 *             stored, its block scales repeated per row (group = block width). */
typedef enum { GPU_BF16 = 0, GPU_F32 = 1, GPU_INT8 = 2, GPU_INT4 = 3, GPU_FP8 = 4 } gpu_dtype;

/* The group of the quantised formats made from BF16/F32/F16 weights. */
#define GPU_QGROUP 128

typedef struct {
    const void *data;      /* device [rows][cols], row-major (INT4: [rows][cols / 2] bytes) */
    gpu_dtype dt;
    int64_t rows, cols;
    const float *scale;    /* INT8/INT4/FP8: device [rows][ceil(cols / group)]; NULL otherwise */
    int group;             /* INT8/INT4/FP8: columns per scale (a multiple of 32); 0 otherwise */
} gpu_mat;

/* y[t][0..W.rows) (+)= x[t][0..W.cols) . W^T (+ bias), t < T; ld* are row
 * strides in floats. accumulate != 0 adds to y (residual adds for free).
 * Quantised W: up to exact_max_T tokens the decode GEMV dequantises in
 * registers (fp32 activations, each 16-byte chunk's sum times its scale);
 * above, row tiles of W are dequantised to BF16 (the context's weight
 * scratch, gpu_ctx_reserve_dequant) and multiplied by cuBLAS as BF16
 * weights are. */
int gpu_matmul(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
               const float *bias, int accumulate);

/* The same, always with the fp32-activation kernel (the router: expert
 * choice must not move with BF16 rounding of its input). */
int gpu_matmul_exact(gpu_ctx *c, float *y, int64_t ldy, const float *x, int64_t ldx, int T, const gpu_mat *W,
                     const float *bias, int accumulate);

/* x[t][0..D) = table[tok[t]] as fp32 (quantised tables dequantised). */
int gpu_embed(gpu_ctx *c, float *x, const gpu_mat *table, const int32_t *tok, int T);

/* RMSNorm of rows of n floats, y = x / sqrt(mean(x^2) + eps) * w (w may be
 * NULL). Row (o, i) for o < n_outer, i < n_inner starts at o*ld_outer +
 * i*ld_inner in both x and y (per-head norms: outer = tokens, inner =
 * heads). y may alias x. */
int gpu_rmsnorm(gpu_ctx *c, float *y, const float *x, int n_outer, int64_t ld_outer, int n_inner, int64_t ld_inner,
                const float *w, int n, float eps);

/* dst[i][0..width) = src[rows[i]][0..width), i < n. */
int gpu_gather_rows(gpu_ctx *c, float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *rows,
                    int n, int width);

/* Rotary embedding in place. Head h of token t starts at x + t*ld_tok +
 * h*ld_head + offset; its first `dim` floats rotate by pos[t] * inv_freq[i]
 * (cos and sin times `scale`). pairs = 0: dims (i, i + dim/2); 1: (2i, 2i+1). */
int gpu_rope(gpu_ctx *c, float *x, int T, int64_t ld_tok, int n_head, int64_t ld_head, int offset, int dim,
             int pairs, const float *inv_freq, float scale, const int32_t *pos);

/* cache[seq[t]*seq_stride + pos[t]*row_stride + j] = src[t*ld_src + j], j < width. */
int gpu_kv_store(gpu_ctx *c, float *cache, int64_t seq_stride, int64_t row_stride, const float *src, int64_t ld_src,
                 int width, int T, const int32_t *seq, const int32_t *pos);

/* Causal GQA over the cache (as src/cpu/attn.h): token t attends to
 * positions [max(0, pos[t]-window+1), pos[t]] of sequence seq[t]. */
typedef struct {
    int n_head, n_kv_head, head_dim;
    float scale;
    int window;                  /* 0 = unlimited */
    const float *k, *v;          /* [n_seq][n_ctx][n_kv_head*head_dim] */
    int64_t seq_stride, row_stride;
} gpu_gqa;
int gpu_attn_gqa(gpu_ctx *c, const gpu_gqa *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                 const int32_t *pos, float *out, int64_t ldo);

/* MLA in the absorbed form (as src/cpu/attn.h attn_mla): q_nope is folded
 * into the latent space through kv_b's key rows, attention runs over the
 * latent cache, kv_b's value rows expand the result per head.
 * scratch: 2 * T * n_head * rank floats. */
typedef struct {
    int n_head, nope, rope, v_dim, rank;
    float scale;
    const float *ckv, *kpe;      /* [n_seq][n_ctx][rank], [n_seq][n_ctx][rope] */
    int64_t ckv_seq_stride, kpe_seq_stride;
    gpu_mat kv_b;                /* [n_head*(nope+v_dim)][rank] */
} gpu_mla;
int gpu_attn_mla(gpu_ctx *c, const gpu_mla *a, int T, const float *q, int64_t ldq, const int32_t *seq,
                 const int32_t *pos, float *out, int64_t ldo, float *scratch);

/* Routing, exactly the rules of src/cpu/router.c (kinds numbered as
 * model.h's route_kind). logits [T][n_expert] -> ids [T][k], w [T][k]. */
enum { GPU_ROUTE_SOFTMAX = 0, GPU_ROUTE_SOFTMAX_GROUP = 1, GPU_ROUTE_SIGMOID_GROUP = 2 };
typedef struct {
    int kind, n_expert, k, norm;
    float scale;
    int n_group, topk_group;
    const float *bias;           /* device [n_expert] or NULL */
} gpu_route_params;
int gpu_route(gpu_ctx *c, const gpu_route_params *r, int T, const float *logits, int32_t *ids, float *w);

/* Fused decode helpers (any T; each falls back to the separate ops where
 * its kernel does not apply, so callers need not check shapes):
 *
 * gpu_qkv_prep: per token t of a fused q|k|v row (ld floats apart): RMSNorm
 * of each q head with q_norm and each k head with k_norm (when non-NULL,
 * eps), rope on the first rope_dim dims of each q and k head (as gpu_rope,
 * offset 0), then k and v rows stored into the caches (as gpu_kv_store).
 * Replaces 2 rmsnorm + 2 rope + 2 kv_store launches by one. */
typedef struct {
    int n_head, n_kv_head, head_dim;
    const float *q_norm, *k_norm; /* [head_dim] or NULL */
    float eps;
    int rope_dim, pairs;
    const float *inv_freq;        /* [rope_dim / 2] */
    float rope_scale;
    float *k_cache, *v_cache;     /* [n_seq][n_ctx][n_kv_head * head_dim] */
    int64_t seq_stride, row_stride;
} gpu_qkv_prep_args;
int gpu_qkv_prep(gpu_ctx *c, const gpu_qkv_prep_args *a, int T, float *qkv, int64_t ld, const int32_t *seq,
                 const int32_t *pos);

/* gpu_add_norm: x[t] += a[t] + b[t] + y[t] (in that order; each may be
 * NULL; a and b are pinned host memory read uncached, as
 * gpu_add_rows_host; y device), rows ld_add apart; then, when h is not
 * NULL, h[t] = RMSNorm(x[t]) * w (as gpu_rmsnorm). x, h: [T][D] packed. */
int gpu_add_norm(gpu_ctx *c, float *x, int T, int D, const float *a_host, const float *b_host, const float *y,
                 int64_t ld_add, const float *w, float eps, float *h);

/* out[t][i] = silu(gu[t][i]) * gu[t][F + i], i < F (gate and up fused). */
int gpu_silu_mul(gpu_ctx *c, float *out, int64_t ldo, const float *gu, int64_t ldgu, int T, int F);
/* x[t][i] += g_t * y[t][i], i < n; g_t = sigmoid(gate[t]) or 1 when gate is NULL. */
int gpu_add_rows(gpu_ctx *c, float *x, int64_t ldx, const float *y, int64_t ldy, int T, int n, const float *gate);
/* dst[i] = bf16(src[i]) */
int gpu_to_bf16(gpu_ctx *c, uint16_t *dst, const float *src, int64_t n);

/* Routed experts held on the GPU: slot[e] >= 0 names expert e's place in
 * gate_up [n_slot][2F][D] and down [n_slot][D][F]; -1 = not on the GPU. */
typedef struct {
    const void *gate_up, *down;
    gpu_dtype dt;
    const int32_t *slot;         /* device [n_expert] */
    int n_expert, d_model, d_ff;
} gpu_experts;
/* Rows of the grouped path: each expert's pairs padded to a multiple of
 * this. The scratch holds the larger of the two paths' needs: T*K*(3F + D)
 * floats for the GEMV; for the grouped GEMMs, R padded rows of BF16 inputs
 * (D), BF16 activations (F) and fp32 outputs (D), and the routing lists. */
#define GPU_MOE_ROW_TILE 64
static inline int64_t gpu_moe_scratch_floats(int64_t T, int64_t K, int64_t E, int64_t D, int64_t F)
{
    const int64_t TK = T * K, R = (TK + E * (GPU_MOE_ROW_TILE - 1) + GPU_MOE_ROW_TILE - 1) / GPU_MOE_ROW_TILE *
                                  GPU_MOE_ROW_TILE;
    const int64_t grouped = (R * (6 * D + 2 * F) + 4 * (3 * E + 1 + R / GPU_MOE_ROW_TILE + TK + R)) / 4 + 16;
    const int64_t gemv = TK * (3 * F + D);
    return grouped > gemv ? grouped : gemv;
}
/* x[t] += sum over k with ids[t][k] >= 0 and slot[ids[t][k]] >= 0 of
 * w[t][k] * expert(h[t]). scratch: gpu_moe_scratch_floats(T, K, n_expert,
 * d_model, d_ff) floats. Up to the decode sizes (T <= the context's exact
 * size) a GEMV per (token, expert) pair with fp32 activations; longer passes
 * of BF16 experts group the pairs by expert into tensor-core GEMMs with the
 * activations rounded to BF16 (gpu_moe_grouped.cu). */
int gpu_moe_experts(gpu_ctx *c, const gpu_experts *ex, int T, int K, const float *h, int64_t ldh,
                    const int32_t *ids, const float *w, float *x, int64_t ldx, float *scratch);

/* Where a MoE layer's routed experts go once routed: the GPU side of the CPU
 * hand-off (the slot, pinned host memory written by a kernel: zero-copy, no
 * copy-engine operations) and the id lists of the GPU-held experts.
 * Deferral (DESIGN.md section 1): per token the `defer` experts of lowest
 * weight (ties: the later of equal weights) are deferred, the others
 * immediate. For k < K of token t, with e = ids[t][k]:
 *   host_ids[t][k]     = e if immediate and not on the GPU, else -1
 *   host_ids_def[t][k] = e if deferred and not on the GPU, else -1
 *   host_w[t][k]       = w[t][k]
 *   gpu_ids[t][k]      = e if immediate, else -1 (gpu_moe_experts skips
 *   gpu_ids_def[t][k]  = e if deferred, else -1   experts not on the GPU)
 *   host_x[t][i]       = h[t][i], i < D (bf16 when x_bf16, else fp32)
 * Any pointer may be NULL (not written); "on the GPU" means slot (device
 * [E], NULL = none) >= 0. */
typedef struct {
    void *host_x;
    int x_bf16;
    int32_t *host_ids, *host_ids_def;
    float *host_w;
    const int32_t *slot;
    int32_t *gpu_ids, *gpu_ids_def;
    int defer;
} gpu_handoff;
/* The lists and the slot from ids, w [T][K] and h [T][D] (device). */
int gpu_handoff_pack(gpu_ctx *c, const gpu_handoff *ho, const float *h, int T, int D, int K, const int32_t *ids,
                     const float *w);

/* The MoE gate of one layer for T tokens, fused for decode: h = RMSNorm(x)
 * * norm_w (eps), logits = router . h (fp32, as gpu_matmul_exact), ids, w =
 * route(logits) (as gpu_route), then gpu_handoff_pack(ho) when ho is not
 * NULL. x, h [T][D]; logits [T][E] scratch; ids, w [T][K]. One launch when
 * T <= 16, E <= 512, k <= 32, groups <= 32 (the last block to finish its
 * router rows routes and packs); otherwise the separate ops. */
int gpu_moe_gate(gpu_ctx *c, int T, int D, const float *x, const float *norm_w, float eps, float *h,
                 const gpu_mat *router, const gpu_route_params *r, float *logits, int32_t *ids, float *w,
                 const gpu_handoff *ho);

/* x[t][i] += y_host[t][i], i < n: the CPU's result read from pinned memory
 * (uncached loads, so a value written after an earlier pass is seen). */
int gpu_add_rows_host(gpu_ctx *c, float *x, int64_t ldx, const float *y_host, int64_t ldy, int T, int n);

#ifdef __cplusplus
}
#endif
#endif
