/*
 * moe.h - the CPU Mixture-of-Experts operator: routed experts packed once,
 * then one call per MoE layer and batch of tokens.
 *
 *   out[t][:] = sum_k w[t][k] * E_{ids[t][k]}(x[t]),   E(x) = down(silu(gate x) * (up x))
 *
 * Ownership: a moe_op holds the packed weights of one layer and is immutable
 * after moe_create() (any number of sessions may share it); a moe_scratch is
 * one session's working memory, sized once, so moe_forward() allocates
 * nothing. One moe_forward() at a time per scratch.
 *
 * Kernels: the kernel set is isa_current() at create time (TANDEM_CPU forces
 * one) or the one given to moe_create_isa(). Each expert's token count picks
 * its kernel: fewer than amx_min tokens -> the vector kernel of the set
 * (AVX-512 VNNI/BF16 dot products, bandwidth-bound decode); otherwise the
 * tile kernel (AMX) where the set has one. Every kernel has a scalar _ref
 * twin with the same numerics.
 *
 * NUMA: the op is built for a pool (pool.h); each pool partition holds a
 * slice of every expert's d_ff (rows of gate/up, columns of down), computes a
 * partial down-sum, and the partials are added in partition order.
 *
 * ---- numerics (identical in every kernel set, ref included) ----------------
 * BF16  activations x are rounded to bf16 (RNE); g = Gate.x and u = Up.x are
 *       sums of exact bf16*bf16 products in fp32; h = bf16(silu(g) * u);
 *       y = Down.h in fp32. Sums run per K pair, odd element first (the SDM
 *       order of VDPBF16PS: AVX-512 matches the reference to the bit); AMX
 *       tiles may sum in another order; AVX-512/AMX treat denormals as zero.
 * INT8  weights symmetric: W = s * q, q in [-127, 127], one fp32 scale s per
 *       row and group of `group` columns along K (moe_desc.group; 0 = one
 *       scale for the whole row, the default: AMX tiles then accumulate the
 *       whole K in int32 without a flush). Stored as u8 u = q + 128 so that
 *       VPDPBUSD (u8 x s8) and TDPBSUD apply; the 128 offset is removed
 *       exactly in int32 with the activation sums.
 * INT4  group 32 along K: W = s * q + m, q in 0..15, s and m fp16 per row and
 *       group (a GGUF Q4_K block repacks with q exact and s, m rounded to fp16,
 *       relative error <= 2^-11 of the scale, i.e. under 1/1000 of a q step).
 *       From an I4SYM source (symmetric int4, W = q * scale, q in [-8, 7], a
 *       bf16 scale per row and 32-group: compressed-tensors pack-quantized)
 *       nothing is requantised: q' = q + 8, s = fp16(scale), m = fp16(-8 * s),
 *       so s * q' + m = q * scale exactly whenever s and m are exact in fp16
 *       (every bf16 scale in fp16's normal range is, and m = -8s is then too,
 *       but past |s| = 8188). A (row, group) whose s or m is not exact
 *       falls back to the float path above for that row and group alone,
 *       from the exact values q * scale, and is counted (moe_inexact_groups,
 *       logged at warn); packing never fails for it.
 *       From a source with src_q4 (GGUF Q4_0, Q4_1, Q4_K experts) nothing is
 *       requantised either: q is copied, s = fp16(s), m = fp16(m) of the
 *       block: Q4_0 (s = d, m = -8d) and Q4_1 (s = d, m = m) are exact, as
 *       their d and m are fp16; Q4_K's s = d * scale and m = -dmin * min are
 *       products of an fp16 and a 6-bit integer, rounded once to fp16
 *       (relative error <= 2^-11 of each, under 1/1000 of a q step). A group
 *       whose s or m is not finite in fp16 takes the float path above.
 * GGUF experts of other types (Q8_0, Q5_K, Q6_K, IQ4_XS, ...) reach every
 *       format through their dequantised rows (src_rows), i.e. are
 *       requantised by the rules above; Q8_0 into INT8 is not exact (INT8
 *       groups are multiples of 64 and its scales fp32 amax / 127).
 * INT8/INT4 activations: per row (token for gate/up, token-expert pair for
 *       down) a = amax|x|, xq = rint(x * (127 / a)) in [-127, 127], sx = a / 127.
 *       Per group g: D_g = sum xq * q (int32, exact), S_g = sum xq (int32).
 *       acc = 0; for g in order: INT8 acc = fma(s_g, (float)D_g, acc);
 *       INT4 acc = fma(s_g, D_g, acc), acc = fma(m_g, S_g, acc). result = sx * acc.
 *       h = silu(g) * u in fp32, then quantised as above for down.
 *       With one partition these kernels are bit-identical to the reference,
 *       but for INT4 on the AMX tile kernels, which by default (moe_tuning.i4)
 *       take result = sx * sum xq * bf16(fma(q, s, m)) in fp32 tile order:
 *       each weight rounded to bf16 (moe_set_tune "i4=0": the exact path).
 * FP8   weights W = s * q, q an E4M3 byte (e4m3fn: max 448, no infinities),
 *       one fp32 scale s per row and group of 128 columns along K (d_ff
 *       slices and K padding are multiples of 128). Packed from an FP8
 *       source whose column blocks hold whole 128-groups (block_k a multiple
 *       of 128, e.g. DeepSeek's 128 x 128 weight_scale_inv), q and s are the
 *       checkpoint's, copied bit for bit (any block_n: the scale is stored
 *       per row). From any other source (or blocks that do not map): s =
 *       amax / 448 over the row's group in fp32, q = E4M3(x / s), rounded to
 *       nearest even and saturated to +-448 (s = 0: q = 0). Activations x
 *       rounded to bf16 (RNE); each q widened to bf16 exactly (every E4M3
 *       value is a bf16 value; the NaN codes 0x7f / 0xff, which only a NaN
 *       source value gives, read as +-480); per group g: D_g = sum of the bf16 * bf16
 *       products in fp32 from 0, pairs in K order, odd element first (as
 *       BF16: VDPBF16PS); acc = fma(s_g, D_g, acc) in group order;
 *       h = bf16(silu(g) * u); down the same with h. AVX-512 matches the
 *       reference to the bit; the AMX tile kernel sums D_g in tile order
 *       (as BF16); the AVX2 set has no FP8 body and declines it (the
 *       reference runs, logged).
 * silu(g) = g / (1 + e(-g)) with e() a shared fma polynomial (moe_impl.h),
 * argument clamped to [-87, 87]. Output: out[t] = fma(w, y, out[t]) over the
 * token's (expert, weight) pairs: first the experts with fewer than amx_min
 * tokens, then the others, each group in ascending expert id (the same order
 * for every kernel set); partition partials are then added in partition
 * order. ids < 0 are skipped.
 */
#ifndef TD_MOE_H
#define TD_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "core/pool.h"

typedef enum { MOE_BF16 = 0, MOE_INT8 = 1, MOE_INT4 = 2, MOE_FP8 = 3 } moe_fmt;
/* What the source rows of moe_desc are. BF16/F32/F16: plain row-major
 * matrices. FP8: E4M3 bytes, row-major, with one fp32 scale per block of
 * block_n rows x block_k columns (DeepSeek's weight_scale_inv): the value is
 * fp8e4m3_to_f32(q) * scale, in fp32. FN: no pointer view at all; the
 * packer asks src_rows() for the rows it needs (dummy weights, sources whose
 * rows must be computed), so no copy of a whole layer is ever made. */
/* I4SYM: symmetric INT4 in compressed-tensors' pack-quantized layout: row r
 * is ceil(cols / 8) little-endian int32 words, column c in word c / 8 at bits
 * 4 * (c % 8) (low nibble first), stored as u = q + 8 in 0..15 (q in [-8, 7]);
 * one bf16 scale per row and group of 32 columns ([rows][ceil(cols / 32)]);
 * the value is q * scale, in fp32. */
typedef enum {
    MOE_SRC_BF16 = 0,
    MOE_SRC_F32 = 1,
    MOE_SRC_F16 = 2,
    MOE_SRC_FP8 = 3,
    MOE_SRC_FN = 4,
    MOE_SRC_I4SYM = 5
} moe_src;
#define MOE_I4SYM_GROUP 32

typedef struct {
    int n_expert, d_model, d_ff;
    moe_fmt fmt;                 /* packed format */
    moe_src src;                 /* dtype of the source rows below */
    const void *const *gate;     /* [n_expert] -> [d_ff][d_model] row-major (HF layout); an entry may be
                                    NULL: that expert is not held on the CPU and is never routed here */
    const void *const *up;       /* [n_expert] -> [d_ff][d_model] */
    const void *const *down;     /* [n_expert] -> [d_model][d_ff] */
    int group;                   /* INT8 only: scale group along K, a multiple of 64; 0 = whole row */
    int amx_min;                 /* tokens per expert from which the tile (AMX) kernel runs;
                                    0 = MOE_AMX_MIN_DEFAULT(fmt) */
    /* MOE_SRC_FP8: [n_expert] -> [ceil(rows / block_n)][ceil(cols / block_k)] fp32 block scales
       of gate, up and down (rows x cols as the matrices above) */
    const float *const *gate_scale, *const *up_scale, *const *down_scale;
    int block_n, block_k;
    /* MOE_SRC_I4SYM: [n_expert] -> [rows][ceil(cols / 32)] bf16 group scales of gate, up and down */
    const uint16_t *const *gate_scale_bf16, *const *up_scale_bf16, *const *down_scale_bf16;
    /* MOE_SRC_FN: out[0..ncol) = source row `row`, columns [col0, col0 + ncol) of matrix `which`
       (0 gate, 1 up, 2 down) of `expert`; m is that expert's gate/up/down entry (non-NULL entries
       still say which experts are held). Called from pool threads, concurrently. */
    void (*src_rows)(void *user, const void *m, int expert, int which, int row, int col0, int ncol, float *out);
    void *src_user;
    /* optional, MOE_SRC_FN into INT4: the 32 weights of source row `row` from column col0 (a multiple of 32)
       in the form W = s * q[k] + m exactly (q in 0..15, s and m fp32; GGUF Q4_0/Q4_1/Q4_K blocks have it):
       returns 1, or 0 when it has no such form (the float path quantises that group then). Called from pool
       threads, concurrently, with src_user. */
    int (*src_q4)(void *user, const void *m, int expert, int which, int row, int col0, uint8_t q[32], float *s,
                  float *mn);
    /* optional: called once per held expert, from a pool thread, as soon as all of it is packed (the
       loader drops that expert's checkpoint pages then, so packing a layer never holds the layer's
       whole source resident beside its packed copy) */
    void (*on_packed)(void *user, int expert);
    void *on_packed_user;
} moe_desc;

/* Packed bytes of one expert (gate, up and down, all partitions) for a shape
 * and format, as moe_create would lay it out for a pool of nparts partitions:
 * what the memory plan counts without packing anything. */
size_t moe_packed_expert_bytes(int d_model, int d_ff, moe_fmt fmt, int group, int nparts);

/* Tokens per expert from which the tile kernel runs, per format, from the
 * H200 switch sweep of 2026-11-29 (bench/results/2026-11-29-h200-moe.txt;
 * Qwen3 shape, 128 experts top-8, so tokens/16 per expert; tile kernel
 * always vs never):
 *   BF16: vector ahead at 4 per expert (11.4 vs 12.0 ms), tile ahead from 8
 *         (11.6 vs 12.4), 2.4x ahead at 32.
 *   INT8: vector ahead at 16 (7.5 vs 8.5 ms), tile ahead at 32 (9.2 vs 13.9);
 *         the lines cross near 20 (on a second machine of the pool the tile
 *         kernel was ahead from 8: 7.2 vs 7.8 ms; 24 costs little on either).
 *   INT4: with the exact int8-tile pass (moe_tuning.i4 = 0) the vector kernel
 *         was ahead at every count up to 64 and the slopes crossed near 120
 *         (that pass folds every 32-group of every 16-row tile on the vector
 *         units). Through bf16 tiles (i4 = 1, the default; sweep of
 *         bench/results/2026-11-29-h200-amx.txt, call 9): vector ahead at 32
 *         per expert (16.6 vs 18.3 ms), tile ahead at 40 (20.5 vs 21.4) and
 *         48 (21.5 vs 25.8). */
#define MOE_AMX_MIN_BF16 8
#define MOE_AMX_MIN_INT8 24
#define MOE_AMX_MIN_INT4 40
/* FP8: BF16's value (its tile pass is BF16's plus a widening and a fold per
 * 128-group); not swept on an AMX machine */
#define MOE_AMX_MIN_FP8 8
#define MOE_AMX_MIN_DEFAULT(fmt)                                                                              \
    ((fmt) == MOE_INT4 ? MOE_AMX_MIN_INT4 : (fmt) == MOE_INT8 ? MOE_AMX_MIN_INT8 : (fmt) == MOE_FP8 ? MOE_AMX_MIN_FP8 \
                                                                                                    : MOE_AMX_MIN_BF16)

typedef struct moe_op moe_op;           /* packed weights, immutable after create */
typedef struct moe_scratch moe_scratch; /* per session: sized once, no allocation per call */

/* Pack (and quantise) the experts of d, in parallel on p. The op is bound to
 * p's partition count and size: moe_forward() must get a pool with the same
 * number of partitions and no more threads. */
int moe_create(moe_op **out, const moe_desc *d, pool *p, char *err, size_t errlen);
/* The same with a given kernel set (ISA_REF..ISA_AMX of core/isa.h);
 * TANDEM_EUNSUPPORTED when this machine lacks it. */
int moe_create_isa(moe_op **out, const moe_desc *d, pool *p, int isa, char *err, size_t errlen);
void moe_free(moe_op *op);
/* Tile-kernel and schedule settings of this op ("kc_bf16=512,i4=0", the keys of
 * `tandem bench moe --tune`; keys left out keep the process defaults), before
 * its first forward; NULL or "" = the process defaults. TANDEM_EINVAL naming
 * a bad key or value (the op is unchanged then). */
int moe_set_tune(moe_op *op, const char *spec, char *err, size_t errlen);

size_t moe_bytes(const moe_op *op);  /* packed bytes of one expert (all partitions) */
int moe_isa(const moe_op *op);       /* kernel set in use */
int moe_n_held(const moe_op *op);    /* experts held on the CPU */
/* INT4 from an I4SYM source: (row, 32-group) pairs whose scale was not exact
 * in fp16 and were requantised (see the numerics above); 0 otherwise */
int64_t moe_inexact_groups(const moe_op *op);
/* the shape and format an op was packed with (for checking a pack read from
 * disk against the model that is to use it) */
void moe_shape(const moe_op *op, int *n_expert, int *d_model, int *d_ff, moe_fmt *fmt);

int moe_scratch_create(const moe_op *op, int max_tokens, int top_k, moe_scratch **out, char *err, size_t errlen);
void moe_scratch_free(moe_scratch *s);
/* The bytes moe_scratch_create would map for an op of this shape, format and
 * pool on kernel set isa holding n_held experts (the memory plan's figure). */
size_t moe_scratch_bytes(int n_expert, int d_model, int d_ff, moe_fmt fmt, int nparts, int nthreads, int isa,
                         int n_held, int max_tokens, int top_k);

/* out[t][:] = sum_k w[t][k] * E_{ids[t][k]}(x[t]),  E(x) = down( silu(gate x) * (up x) ),
 * skipping ids[t][k] < 0. x [n][d_model] fp32; ids/w [n][top_k]; out [n][d_model] fp32, overwritten.
 * n <= max_tokens and top_k <= top_k of the scratch. Returns 0, or TANDEM_EINVAL (message in
 * moe_scratch_error(s)) for an id out of range or routed to an expert not held here. */
int moe_forward(moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const float *x,
                const int32_t *ids, const float *w, float *out);
/* same with bf16 activations (the GPU hands over bf16 hidden states) */
int moe_forward_bf16(moe_op *op, moe_scratch *s, pool *p, int n, int top_k, const uint16_t *x,
                     const int32_t *ids, const float *w, float *out);
/* The same, with tokens [0, n_early) early: the experts they use are
 * computed first, and early(arg) is called once, from a pool thread or the
 * caller, as soon as out's early rows are final (before the call returns;
 * with NUMA partitions, at its end). Late rows are final at return. The
 * hybrid hand-off computes a layer's immediate experts (early rows) and its
 * deferred ones (late rows) in one call this way, and signals the GPU from
 * early(). A late row's sum takes experts early rows also use first, so it
 * can differ in rounding with the batch (early rows cannot). On an error
 * (an id not held here) early() is not called. */
int moe_forward_bf16_early(moe_op *op, moe_scratch *s, pool *p, int n, int n_early, int top_k, const uint16_t *x,
                           const int32_t *ids, const float *w, float *out, void (*early)(void *), void *arg);
const char *moe_scratch_error(const moe_scratch *s);

/* Packed experts on disk (`tandem convert`): the file holds the packed
 * partition buffers as they are in memory, so moe_open_packed() maps them
 * (one NUMA node) or reads each slice onto its node. The pool given to
 * open must have as many partitions as the one the op was packed for. */
int moe_save(const moe_op *op, const char *path, char *err, size_t errlen);

int moe_open_packed(moe_op **out, const char *path, pool *p, int isa /* <0: isa_current() */,
                    char *err, size_t errlen);

#endif
