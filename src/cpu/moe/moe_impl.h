/*
 * moe_impl.h - what the files of the MoE operator share: the packed layout,
 * the op and scratch structures, the kernel interface and the scalar
 * numerics every kernel must reproduce. Not part of the public API.
 *
 * Packed layout of one matrix W[N][K] (N outputs, K inputs; one expert, one
 * partition slice). Rows are cut into row blocks ("rb") of 16; K is padded
 * with zeros to kp (a multiple of 64). A row block is contiguous, so a work
 * item streams it from DRAM in order; blocks follow each other:
 *
 *   BF16  rb = kp/32 tiles of 1024 B. Tile row r (0..15) holds, for the 16
 *         rows n, the bf16 pair W[n][32t+2r], W[n][32t+2r+1] in 4 bytes:
 *         one AVX-512 register (lane n = output row) and one row of an AMX B
 *         tile in the VNNI pair layout TDPBF16PS reads.
 *   INT8  rb = groups of `group` columns; a group is group/64 tiles of 1024 B
 *         (tile row r: lane n holds u8 W[n][64t+4r..+3], the quad layout of
 *         VPDPBUSD / TDPBSUD) followed by the 16 rows' fp32 scales (64 B).
 *   INT4  rb = kp/32 blocks of 320 B: 256 B of nibbles, then 16 fp16 scales,
 *         then 16 fp16 mins. Nibble byte c*64 + n*4 + j (c = 0..3) holds
 *         q[n][4c+j] in its low half and q[n][4(c+4)+j] in its high half, so
 *         one 64-byte load gives two VNNI quad rows (c and c+4) after an AND
 *         and a shift.
 *   FP8   rb = kp/128 groups of 2112 B: 32 lines of 64 B holding E4M3 bytes,
 *         then the 16 rows' fp32 scales of the group (64 B). Line l holds
 *         K columns 4l..4l+3 of the group for the 16 rows, ordered for
 *         VPUNPCK{L,H}BW: byte 16(n/4) + 8(j/2) + 2(n%4) + (j%2) is
 *         q[n][4l+j], so in each 128-bit lane the low 8 bytes are the pair
 *         (4l, 4l+1) of rows 4(n/4)..+3 and the high 8 bytes the pair
 *         (4l+2, 4l+3): one load, two unpacks against zero and a widening
 *         give two BF16 tile rows (lane n = row n), as VDPBF16PS and an AMX
 *         B tile read them. K is padded to 128 and d_ff is cut into slices
 *         of 128 (kalign), so a DeepSeek 128 x 128 block scale maps onto
 *         one group of 16-row blocks exactly.
 *
 * Every block and tile starts on a 64-byte boundary.
 *
 * Activation rows (gathered x, h, quantised h) of an expert run by a tile
 * kernel (moe_kernel.tiled) are "tiled": its rows start at a multiple of 16
 * and each block of 16 rows is stored as K/W tiles of 16 x 64 bytes (W = 32
 * bf16 or 64 int8 per tile row), so an AMX A tile is 1 KB of contiguous
 * memory (stride 64) instead of 16 rows a row-length apart (with a row of
 * 4 KB, e.g. Qwen3's bf16 x, all 16 rows fall into one L1 set). The byte
 * of (row r, 64-byte chunk c) is moe_act_chunk(); the row scale and sums of
 * 32 stay per row. Other experts' rows are plain row-major.
 */
#ifndef TD_MOE_IMPL_H
#define TD_MOE_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/bf16.h"
#include "cpu/moe/moe.h"

#define MOE_RB 16           /* rows per row block */
#define MOE_KALIGN 64       /* K padding and partition-slice granularity */
#define MOE_MAX_PARTS 16
#define MOE_MAX_K 65536     /* int32 sums stay exact: 255 * 127 * 65536 < 2^31 */
#define MOE_MAXPAIR 8       /* column-block pairs per tile-kernel call */
#define MOE_MC 512          /* most token rows per pass of the tile kernels (moe_tuning.mc) */
#define MOE_TSCRATCH (1572u * 1024u) /* per-thread scratch of the tile kernels */
#define MOE_G4_MAX 128      /* INT4 tile pass: most 32-groups unpacked at once */
#define MOE_TB_BF16 12      /* tokens per pass of the vector kernels */
#define MOE_TB_INT 6        /* INT8 */
#define MOE_TB_INT4 4
#define MOE_TB_FP8 6        /* FP8: a group's partial sums and the totals both stay in registers */
#define MOE_MAX_GROUPS (MOE_MAX_K / 64)

/* ---- layout ----------------------------------------------------------- */

static inline size_t moe_int8_group_bytes(int group) { return (size_t)group / 64 * 1024 + 64; }

#define MOE_FP8_G 128        /* FP8 scale group along K (and its K / slice alignment) */
#define MOE_FP8_GBYTES 2112  /* one group of one row block: 16 x 128 E4M3 + 16 fp32 scales */

/* bytes of one row block of a matrix with kp padded columns */
static inline size_t moe_rb_bytes(int fmt, int kp, int group)
{
    switch (fmt) {
    case MOE_BF16: return (size_t)kp * 32;
    case MOE_INT8: return (size_t)(kp / group) * moe_int8_group_bytes(group);
    case MOE_FP8: return (size_t)(kp / MOE_FP8_G) * MOE_FP8_GBYTES;
    default: return (size_t)(kp / 32) * 320;
    }
}

/* byte offset of W[n][k] (n = row inside the block) for BF16 / INT8 / INT4 */
static inline size_t moe_off_bf16(int n, int k)
{
    return (size_t)(k / 32) * 1024 + (size_t)((k % 32) / 2) * 64 + (size_t)n * 4 + (size_t)(k % 2) * 2;
}
static inline size_t moe_off_int8(int n, int k, int group)
{
    return (size_t)(k / group) * moe_int8_group_bytes(group) + (size_t)((k % group) / 64) * 1024 +
           (size_t)((k % 64) / 4) * 64 + (size_t)n * 4 + (size_t)(k % 4);
}
static inline size_t moe_off_int8_scale(int n, int g, int group)
{
    return (size_t)g * moe_int8_group_bytes(group) + (size_t)group / 64 * 1024 + (size_t)n * 4;
}
/* INT4: byte of q[n][k] and the shift of its nibble */
static inline size_t moe_off_int4(int n, int k, int *shift)
{
    int r = (k % 32) / 4;
    *shift = r >= 4 ? 4 : 0;
    return (size_t)(k / 32) * 320 + (size_t)(r % 4) * 64 + (size_t)n * 4 + (size_t)(k % 4);
}

/* FP8: byte of q[n][k], and the fp32 scale of row n, group g */
static inline size_t moe_off_fp8(int n, int k)
{
    int j = k % 4;
    return (size_t)(k / MOE_FP8_G) * MOE_FP8_GBYTES + (size_t)((k % MOE_FP8_G) / 4) * 64 + (size_t)(n / 4) * 16 +
           (size_t)(j / 2) * 8 + (size_t)(n % 4) * 2 + (size_t)(j % 2);
}
static inline size_t moe_off_fp8_scale(int n, int g)
{
    return (size_t)g * MOE_FP8_GBYTES + 2048 + (size_t)n * 4;
}

/* An E4M3 byte widened to bf16 bits, exactly (every E4M3 value is a bf16
 * value), with the integer steps the vector kernels use on 32 words at a
 * time: normal numbers rebias the exponent (7 -> 127) by one shift and one
 * add; exponent 0 (zero and the subnormals m * 2^-9) comes from an 8-entry
 * table; the sign is or-ed in. The NaN codes 0x7f / 0xff are not weights
 * (only a NaN source value packs to one); they read as +-480 in every
 * kernel set. */
static const uint16_t moe_e4m3_sub[32] = { 0x0000, 0x3b00, 0x3b80, 0x3bc0, 0x3c00, 0x3c20, 0x3c40, 0x3c60 };
static inline uint16_t moe_e4m3_to_bf16(uint8_t q)
{
    uint16_t mag = (q & 0x78) ? (uint16_t)(((q & 0x7f) << 4) + 0x3c00) : moe_e4m3_sub[q & 7];
    return (uint16_t)(mag | ((q & 0x80) << 8));
}

/* byte address of 64-byte chunk c of activation row r in an array of rows
 * of rowbytes bytes starting at base (row 0), plain or tiled (see above) */
static inline uint8_t *moe_act_chunk(uint8_t *base, size_t rowbytes, int r, int c, int tiled)
{
    if (!tiled)
        return base + (size_t)r * rowbytes + (size_t)c * 64;
    return base + (size_t)(r / 16) * 16 * rowbytes + (size_t)c * 1024 + (size_t)(r % 16) * 64;
}

/* ---- tuning of the tile kernels and the schedule ------------------------
 * Each op runs with its own settings when it has them (moe_set_tune: the
 * engine's moe_tune parameter, tandem_moe_params.tune), else with the
 * process default moe_tuning, which `tandem bench moe --tune k=v,...` and the
 * tests change between forwards to sweep them. The library reads no
 * environment for them. A forward points moe_tune_cur at the op's settings
 * on every thread that runs its items (and puts it back after), so the
 * kernels read MOE_TUNE without an argument threaded through them. Never
 * written while a forward runs. */
typedef struct {
    int kc_bf16;  /* K per accumulator chunk of the BF16 tile pass (multiple of 32) */
    int kc_int8;  /* INT8, whole-row scales (multiple of 64) */
    int g4;       /* INT4 tile pass: 32-groups unpacked to int8 per chunk (1..MOE_G4_MAX) */
    int np_up;    /* column-block pairs per phase-1 item of a tile-kernel expert (1..MOE_MAXPAIR) */
    int cg;       /* phase-2 item width in row blocks (even, 2..2*MOE_MAXPAIR); 0 = by size */
    int up_rb;    /* row blocks per phase-1 item of a vector-kernel expert (1..64); 0 = by size */
    int ord;      /* tile pass loop order in a chunk: 0 pair-major, 1 token-major */
    int pf;       /* tile pass: prefetch the next step's A (1) / B (2) tiles into L1 */
    int pfd;      /* AVX-512 vector kernels: software prefetch distance in bytes along a row block; 0 = none */
    int pfh;      /* AVX-512 vector kernels: 0 = prefetch into L1 (T0), 1 = into L2 (T1) */
    int sp;       /* tile pass: 1 = each tile of the next K step loaded right after the last TDP reading it */
    int mc;       /* tile pass: token rows per pass (multiple of 32, 32..MOE_MC): weights are read once per pass */
    int nt;       /* gather: 1 = write tiled activation rows with non-temporal stores (no read for ownership) */
    int i4;       /* INT4 tile pass: 0 = int8 tiles, exact; 1 = weights dequantised to bf16 tiles (see moe_amx_body.h) */
} moe_tune;
extern moe_tune moe_tuning;                       /* the process default */
extern _Thread_local const moe_tune *moe_tune_cur; /* what this thread's kernels read (&moe_tuning outside a forward) */
#define MOE_TUNE (*moe_tune_cur)
/* "kc_bf16=512,np_up=4": set fields of *t; TANDEM_EINVAL naming the bad key
 * or value (nothing changed then) */
int moe_tune_parse_into(moe_tune *t, const char *spec, char *err, size_t errlen);
/* the same on the process default moe_tuning */
int moe_tune_parse(const char *spec, char *err, size_t errlen);
/* the default's values as "kc_bf16=...,np_up=..." (a spec moe_tune_parse takes) */
void moe_tune_str(char *buf, size_t n);

/* ---- where a forward's time goes (`tandem bench moe --prof`) -------------
 * With moe_prof_on set (by the bench, between forwards), every item of a
 * forward adds its nanoseconds to its thread's line, by kind (big: experts
 * of amx_min tokens or more, run by op->big, the tile kernel on AMX); time
 * spent spinning in a dependency wait goes to MOE_PF_WAIT, not to the item. */
enum { MOE_PF_GATHER, MOE_PF_UP_BIG, MOE_PF_UP_SMALL, MOE_PF_QUANT, MOE_PF_DOWN_BIG, MOE_PF_DOWN_SMALL, MOE_PF_WAIT,
       MOE_PF_N };
#define MOE_PF_THREADS 256
extern int moe_prof_on;
extern _Alignas(64) int64_t moe_prof_ns[MOE_PF_THREADS][8]; /* one line per pool thread */

/* ---- the AMX tile configuration (LDTILECFG's 64-byte operand) ---------- */
typedef struct {
    uint8_t palette, start_row, rsv[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} moe_tilecfg;
_Static_assert(sizeof(moe_tilecfg) == 64, "the tile configuration is 64 bytes");

/* palette 1, tiles 0..7 all 16 rows x 64 bytes (the 2x2 loop's shapes) */
static inline void moe_tilecfg_full(moe_tilecfg *c)
{
    memset(c, 0, sizeof *c);
    c->palette = 1;
    for (int t = 0; t < 8; t++) {
        c->rows[t] = 16;
        c->colsb[t] = 64;
    }
}

/* ---- one packed matrix as a kernel sees it ----------------------------- */
typedef struct {
    const uint8_t *w;   /* row block 0 */
    size_t rb_bytes;
    int nrb;            /* row blocks */
    int kp;             /* padded K (multiple of 64) */
    int group;          /* INT8: K per scale group (divides kp); INT4: 32; FP8: 128; BF16: kp */
} moe_mat;

/* activation rows of one product (an expert's rows: gathered x, or h);
 * tiled for the tile kernels: x points at the first tile of the K range,
 * and 16-row block i starts 16 * ld elements after block i - 1 */
typedef struct {
    const void *x;       /* [m][ld] bf16 (BF16) or int8 */
    const float *sx;     /* [m] int formats: row scale */
    const int32_t *s32;  /* [m][lds] int formats: sums of 32 consecutive xq */
    size_t ld, lds;      /* row strides in elements */
    int m;               /* rows */
} moe_act;

/* Phase 1: rows [rb0, rb1) of gate and up for the m rows of a; writes
 * h[i][rb*16 + j] (bf16 for BF16, fp32 otherwise; row stride ldh elements;
 * a tiled kernel writes BF16 h tiled, with h at the slice's first tile).
 * Phase 2: rows [rb0, rb1) of down for the rows of a (h quantised / bf16);
 * out[tok[i]][c] = fma(wt[i], y[i][c], out[tok[i]][c]) for c < ncols; rows
 * i with tok[i] < 0 are padding and skipped. ts: the thread's scratch. */
typedef void (*moe_up_fn)(int fmt, const moe_mat *g, const moe_mat *u, int rb0, int rb1,
                          const moe_act *a, void *h, size_t ldh, void *ts);
typedef void (*moe_down_fn)(int fmt, const moe_mat *d, int rb0, int rb1, const moe_act *a,
                            const int32_t *tok, const float *wt, float *out, size_t ldo, int ncols,
                            void *ts);

typedef struct {
    const char *name;
    int isa;
    /* 1 if the kernel runs this format/group; 0 declines (caller falls back) */
    int (*accepts)(int fmt, int group);
    moe_up_fn up;
    moe_down_fn down;
    int tiled;      /* reads tiled activation rows (and writes BF16 h tiled) */
} moe_kernel;

extern const moe_kernel moe_kernel_ref, moe_kernel_avx2, moe_kernel_avx512, moe_kernel_amx;
/* the AMX kernels on a tile emulator (tests on machines without AMX; needs AVX-512) */
extern const moe_kernel moe_kernel_amx_emu;

/* ---- the op ------------------------------------------------------------ */
typedef struct {
    int lo, hi;    /* real d_ff range [lo, hi) of this partition */
    int pad;       /* padded length (multiple of kalign): rows of gate/up, K of down */
    int off;       /* first column of the slice in h rows */
} moe_slice;

enum { MOE_BUF_HUGE = 0, MOE_BUF_NUMA = 1, MOE_BUF_MAP = 2 };

struct moe_op {
    int n_expert, d_model, d_ff, fmt, group; /* group: INT8 desc group (0 = row) */
    int isa, amx_min;
    int own_tune;   /* 1: tune below (moe_set_tune); 0: the process default moe_tuning */
    moe_tune tune;
    const moe_kernel *small, *big;  /* vector kernel; tile kernel (or the vector one) */
    int nparts, nthreads;
    int kalign;     /* K padding / slice granularity: 64, or the INT8 group */
    int kp;         /* d_model padded: K of gate/up */
    int np;         /* d_model padded to 32: rows of down */
    int ffpad;      /* columns of h: sum of slice pads */
    moe_slice sl[MOE_MAX_PARTS];
    size_t gate_bytes[MOE_MAX_PARTS]; /* one expert's gate (= up) slice */
    size_t down_bytes[MOE_MAX_PARTS];
    size_t exp_bytes[MOE_MAX_PARTS];  /* gate + up + down, 64-aligned */
    uint8_t *buf[MOE_MAX_PARTS];      /* [n_held] experts of partition p */
    size_t buf_bytes[MOE_MAX_PARTS];
    int buf_kind[MOE_MAX_PARTS];
    int32_t *slot;  /* [n_expert] index among held experts, -1 if not held */
    int n_held;
    int64_t inexact; /* INT4 from I4SYM: (row, group) pairs requantised (moe_inexact_groups) */
    void *map;      /* moe_open_packed: the file mapping */
    size_t map_len;
};

/* which = 0 gate, 1 up, 2 down */
static inline moe_mat moe_mat_of(const struct moe_op *op, int p, int e, int which)
{
    moe_mat m;
    const uint8_t *base = op->buf[p] + (size_t)op->slot[e] * op->exp_bytes[p];
    if (which < 2) {
        m.w = base + (size_t)which * op->gate_bytes[p];
        m.kp = op->kp;
        m.nrb = op->sl[p].pad / MOE_RB;
    } else {
        m.w = base + 2 * op->gate_bytes[p];
        m.kp = op->sl[p].pad;
        m.nrb = op->np / MOE_RB;
    }
    m.group = op->fmt == MOE_INT4  ? 32
              : op->fmt == MOE_INT8 ? (op->group ? op->group : m.kp)
              : op->fmt == MOE_FP8  ? MOE_FP8_G
                                    : m.kp;
    m.rb_bytes = m.kp ? moe_rb_bytes(op->fmt, m.kp, m.group) : 0;
    return m;
}

/* Fill sizes, slices and padding of op from n_expert/d_model/d_ff/fmt/group/
 * nparts (moe.c); shared with moe_open_packed to check a file. */
void moe_layout(struct moe_op *op);
/* op zeroed and laid out for a shape alone (sizes without an op: the plan) */
void moe_layout_shape(struct moe_op *op, int n_expert, int d_model, int d_ff, int fmt, int group, int nparts);
/* the tile-kernel settings op runs with */
static inline const moe_tune *moe_op_tune(const struct moe_op *op) { return op->own_tune ? &op->tune : &moe_tuning; }

/* Validate d (shape, format, isa
 * against this CPU, pool) and fill the plain fields of op;
 * moe_pick_kernels() then sets small/big for op->isa. */
int moe_check_desc(const moe_desc *d, pool *p, int isa, struct moe_op *op, char *err, size_t errlen);
void moe_pick_kernels(struct moe_op *op);

/* ---- shared scalar numerics ------------------------------------------- */
#define MOE_EXP_LN2_HI 0.693359375f
#define MOE_EXP_LN2_LO (-2.12194440e-4f)
#define MOE_EXP_LOG2E 1.44269504088896341f
#define MOE_EXP_P0 1.9875691500e-4f
#define MOE_EXP_P1 1.3981999507e-3f
#define MOE_EXP_P2 8.3334519073e-3f
#define MOE_EXP_P3 4.1665795894e-2f
#define MOE_EXP_P4 1.6666665459e-1f
#define MOE_EXP_P5 5.0000001201e-1f
#define MOE_EXP_CLAMP 87.0f

/* e^t for t in [-87, 87] (clamped): n = rint(t log2 e), r = t - n ln2 in two
 * fma steps, degree-7 polynomial (Cephes expf), times 2^n. Vector kernels do
 * the same operations in the same order, so results agree to the bit. */
static inline float moe_exp(float t)
{
    t = t > MOE_EXP_CLAMP ? MOE_EXP_CLAMP : t < -MOE_EXP_CLAMP ? -MOE_EXP_CLAMP : t;
    float n = nearbyintf(t * MOE_EXP_LOG2E);
    float r = fmaf(n, -MOE_EXP_LN2_HI, t);
    r = fmaf(n, -MOE_EXP_LN2_LO, r);
    float z = r * r;
    float y = fmaf(MOE_EXP_P0, r, MOE_EXP_P1);
    y = fmaf(y, r, MOE_EXP_P2);
    y = fmaf(y, r, MOE_EXP_P3);
    y = fmaf(y, r, MOE_EXP_P4);
    y = fmaf(y, r, MOE_EXP_P5);
    y = fmaf(y, z, r);
    y = y + 1.0f;
    uint32_t bits = (uint32_t)((int)n + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return y * s;
}

static inline float moe_silu(float g) { return g / (1.0f + moe_exp(-g)); }

/* shared activation quantisation (moe_act.c): one row of k values to int8
 * with a zero tail up to kp, its scale and sums of 32 */
void moe_quant_row_f32(const float *x, int k, int kp, int8_t *q, float *sx, int32_t *s32);
void moe_quant_row_bf16(const uint16_t *x, int k, int kp, int8_t *q, float *sx, int32_t *s32);
void moe_bf16_row_f32(const float *x, int k, int kp, uint16_t *out);

/* scalar fp32 <-> fp16 (RNE), for packing INT4 scales */
uint16_t moe_f32_to_f16(float f);
/* fp32 -> E4M3 (RNE, saturating to +-448; NaN -> 0x7f), for packing FP8 */
uint8_t moe_f32_to_e4m3(float f);

/* activations and h of this format are bf16 (BF16, FP8), not int8 */
static inline int moe_act_bf16(int fmt) { return fmt == MOE_BF16 || fmt == MOE_FP8; }

/* pack one expert (all partitions) from the source rows (moe_pack.c);
 * rb-granular so that moe_create can spread it over the pool */
typedef struct {
    const void *gate, *up, *down;  /* one expert's source matrices (FN: the desc's entries, passed back) */
    int src;                       /* moe_src */
    const moe_desc *d;             /* FP8, I4SYM: scales (and block shape); FN: src_rows and src_user */
} moe_src_exp;
/* pack row block rb of matrix `which` (0 gate, 1 up, 2 down) of expert e
 * into partition p; -1 when out of memory for its staging rows, else the
 * number of (row, group) pairs of an I4SYM source that could not be copied
 * exactly into INT4 and were requantised (0 for every other case) */
int moe_pack_rb(const struct moe_op *op, const moe_src_exp *s, int p, int e, int which, int rb);

/* Large buffers (packed experts, scratch): a 2 MB-aligned anonymous mapping
 * advised for transparent huge pages, so streaming weights does not walk the
 * page tables every 4 KB and first touch faults 512x less often. Zeroed.
 * NULL on failure; free with the same size. */
void *moe_huge_alloc(size_t n);
void moe_huge_free(void *p, size_t n);

#endif
