/*
 * moe_amx_body.h - the AMX tile kernels (prefill: many tokens per expert),
 * written once against tile-operation macros and included twice:
 *   moe_amx.c           the macros are AMX instructions (the shipped kernel);
 *   moe_amxemu_avx512.c the macros call a scalar tile emulator that follows
 *                       the SDM pseudo-code and checks every tile shape, so
 *                       the test group runs this exact code on machines
 *                       without AMX.
 * The includer defines AMX_CFG(cfg), AMX_LOAD(t, p, stride), AMX_STORE(t, p,
 * stride), AMX_ZERO(t), AMX_DP_BF16(c, a, b) (TDPBF16PS), AMX_DP_SU8(c, a, b)
 * (TDPBSUD: a signed, b unsigned), AMX_RELEASE(), AMX_KERNEL (the symbol of
 * the moe_kernel to define) and AMX_KNAME (its name string).
 *
 * Register blocking 2 x 2: tiles 0..3 accumulate C[mt][n] = tile 2*mt + n
 * (mt: which of two 16-row token tiles, n: which of two 16-column weight
 * blocks), 4/5 hold the two A (token) tiles, 6/7 the two B (weight) tiles,
 * so every tile loaded feeds two TDPs. A tiles come from the tiled
 * activation rows (moe_impl.h): 1 KB contiguous, no L1 set conflicts. B
 * tiles come straight from the packed layout, which is already the VNNI B
 * layout (BF16: 16 K-pair rows x 16 columns; INT8: 16 K-quad rows).
 *
 * One pass = up to moe_tuning.mc token rows x npair column-block pairs
 * (gate/up of the same rows in phase 1, neighbouring down blocks in phase
 * 2). Loop order: K chunk, then pair and token-tile pair (moe_tuning.ord
 * picks which is outer), then K step. The chunk's A (mc rows x chunk) stays in L2 while the pairs
 * run over it; a pair's B chunk is read from DRAM once per pass (prefetched
 * while the previous block runs) and re-read from L2 by every token-tile
 * pair. The accumulators stay in the tiles for a whole chunk
 * (moe_tuning.kc_bf16 / kc_int8 of K) and are spilled between chunks to a
 * per-block 4 KB buffer. By default (moe_tuning.sp) the tiles of the next K
 * step are loaded during the current one, each right after the last TDP
 * that reads its register, and nothing is prefetched into L1.
 *
 * What bounds it (dev/amx_micro.c on the H200 machine, 16 threads): the 2x2
 * loop with its operands in L1 runs at 0.55-0.72 of the same TDPs on
 * registers, with both operands in L2 at 0.47-0.55, and software L1
 * prefetches cost more than they hide. The passes above have A and B in
 * L2; `tandem bench moe` prints the with-loads ceiling (ld_*) beside the
 * register peak. The tunables exist because the developer machines have
 * no AMX: `tandem bench moe --tune` sweeps them on one that has
 * (dev/h200_amx.sh; bench/results/2026-11-29-h200-amx.txt).
 *
 * BF16 accumulates in fp32 tiles. INT8 accumulates int32 over each scale
 * group (the whole row by default), then folds into the fp32 result exactly
 * as moe.h states (fma(s, D, acc) per group in order; the u8 offset of 128
 * removed with the activation sums); INT8 results are bit-identical to the
 * reference. INT4 has two passes (moe_tuning.i4): by default (1) the
 * weights are dequantised to bf16 tiles per K chunk and the activations
 * widened to bf16, then the BF16 loop runs (rounds each weight to bf16, see
 * pass_int4_bf16; 1.2-1.8x faster from 128 tokens per expert on the H200);
 * with i4 = 0 it unpacks a pair's nibbles once per pass and chunk of
 * moe_tuning.g4 groups into int8 B tiles of 8 quad rows (K = 32, one
 * group), reused by every token tile, and folds each group's int32 tile
 * with fma(m, S, fma(s, D, acc)) into an accumulator block that stays in
 * L1: bit-identical to the reference, and bound by those folds. FP8
 * widens its E4M3 weights to bf16 tiles and folds per 128-group
 * (pass_fp8).
 */
/*
 * ---- the plan for AMX prefill (issue 17) --------------------------------
 * What bounds a tile pass is the L2 -> L1 feed, not the TDPs. One 2 x 2
 * step is 4 TDPs (64 cycles at the BF16 rate, 16 per TDP) fed by 4 tile
 * loads of 1 KB: 64 bytes a cycle if A and B both come from L2, which is
 * the whole L2 -> L1 bandwidth of a core, so such a loop runs at about
 * half the register peak; with one operand resident in L1 it needs 32
 * bytes a cycle from L2, and the 2 x 2 loop on L1 operands runs at the
 * register peak (dev/moe_tile_lab.c measures both, in thread CPU time, so
 * a shared machine's load does not enter; figures in bench/results).
 *
 * Schedule (per thread, one work item = one expert x np_up column-block
 * pairs of gate/up, or x 2 * np pairs of down):
 *   resident  the B chunk of one pair: 2 blocks x kc / 32 tiles of 1 KB
 *             (kc = 256: 16 KB), read from DRAM once per pass and kept in
 *             L1 while every token-tile pair of the pass (up to mc rows)
 *             runs over it; the accumulators of one token-tile pair stay in
 *             tmm0..3 across the chunk and spill to a 4 KB block between
 *             chunks (1 spill per 32 TDPs at kc = 256).
 *   streamed  A: the pass's activation rows, tiled (moe_impl.h), so each
 *             A tile is one contiguous 1 KB run from L2 (no set conflicts);
 *             the next pair's B chunk is prefetched into L2 while the
 *             current one runs.
 *   B layout  packed once at load in the VNNI B order (BF16: a tile row =
 *             16 columns x one K pair; INT8: x one K quad), a row block's
 *             tiles back to back, so a TILELOADD of B is 16 consecutive
 *             lines and a pass reads each row block front to back.
 *   INT4      never a per-group fold per TDP: per (pair, K chunk) the
 *             nibbles are unpacked once into bf16 tiles, w = bf16(fma(q, s,
 *             m)), in a per-thread buffer (the resident B above), reused by
 *             every token tile of the pass (all rows of the expert up to mc);
 *             the activations (int8, exact in bf16) are widened once per
 *             chunk. The unpack is a fixed cost per weight, so its share
 *             falls as 1 / (rows per expert): with 64 rows (DeepSeek-V3, 512
 *             tokens over 64 experts) it is most of the pass, with 256+ a
 *             minority. It is written so each output row is one broadcast,
 *             one byte shuffle, one convert and one FMA per 16 lanes, and
 *             the nibbles are prefetched ahead (stage_b_i4).
 *   overlap   gate and up of the same rows form a pair (one A load feeds
 *             both); a thread that finishes an expert's gate/up items goes
 *             on to the activation quantisation of finished experts and to
 *             their down items (moe_fwd.c: one job, items with
 *             dependencies, no barrier), so quantisation and down of
 *             expert e overlap gate/up of expert e + 1 on the other thread.
 *
 * Expected fraction of peak at 2048+ tokens per layer (256+ rows per
 * expert): BF16 / INT8 about 0.7 of the register peak when B stays in L1
 * and A streams from L2 at 32 B a cycle (the with-loads loop), less the
 * spills and the epilogue (silu, h stores): 0.5-0.6. INT4 through bf16
 * tiles can reach at most the BF16 rate, i.e. 0.5 of the INT8 peak that
 * its roofline uses, less the unpack (a fixed cost per weight): 0.3-0.4 at
 * 256 rows per expert; beating that needs int8 tiles with whole-row
 * accumulation, which group-32 scales do not allow without requantising
 * (a numerics change, left for a measured decision). What the current
 * code reaches is in bench/results; where it falls short the cause is the
 * L2 feed (B chunks that do not stay in L1 while A streams through it).
 */
#ifndef AMX_KERNEL
#error "define the tile-operation macros and AMX_KERNEL before including moe_amx_body.h"
#endif

#include "cpu/moe/moe_simd512.h"
#include "core/err.h"
#include "core/isa.h"

#define AMX_CF_BYTES ((size_t)MOE_MC * MOE_MAXPAIR * 32 * 4) /* result of one pass */
#define AMX_G4_BYTES 1280 /* one unpacked INT4 group of a pair: 2 B tiles of 512 B, 2 x 16 scales, 2 x 16 mins */
#define AMX_I4_PFD 8      /* INT4 unpack: prefetch distance in 32-groups */
#define AMX_I4_KC 512     /* INT4 through BF16 tiles: most K per chunk (staging below) */
#define AMX_I4A_BYTES ((size_t)MOE_MC * AMX_I4_KC * 2) /* a chunk's A as bf16 tiles */
#define AMX_I4B_BYTES ((size_t)2 * AMX_I4_KC * 32)     /* a pair's chunk of B as bf16 tiles */

_Static_assert(2 * AMX_CF_BYTES + 4096 + AMX_I4A_BYTES + AMX_I4B_BYTES <= MOE_TSCRATCH,
               "per-thread scratch too small for a pass");
_Static_assert((size_t)MOE_G4_MAX * AMX_G4_BYTES + 32 * MOE_G4_MAX * 4 <= AMX_CF_BYTES,
               "INT4 staging must fit the spill buffer it reuses");

/* all tiles 16 x 64 bytes; the exact INT4 pass: A tiles of 32 bytes (one
 * 32-group of int8), B tiles of 8 quad rows */
static void amx_config(int int4)
{
    moe_tilecfg c;
    moe_tilecfg_full(&c);
    if (int4) {
        c.colsb[4] = c.colsb[5] = 32;
        c.rows[6] = c.rows[7] = 8;
    }
    AMX_CFG(&c);
}

typedef struct {
    const moe_mat *W;                    /* layout of the weight blocks */
    const uint8_t *b[2 * MOE_MAXPAIR];   /* pair j: row-block bases b[2j], b[2j+1] */
    int npair;
    const uint8_t *x;                    /* A: first tile of the pass's first 16-row block */
    size_t mstride;                      /* bytes from one 16-row block to the next */
    const int32_t *s32;                  /* INT: sums of 32 of row 0, stride lds */
    size_t lds;
    int nmt;                             /* 16-row token tiles (1..moe_tuning.mc/16) */
    float *cf;                           /* [nmt*16][npair*32] fp32 result, row-major */
    uint8_t *cbuf;                       /* accumulator spill: 4 KB per (token-tile pair, pair) */
    uint8_t *tmp;                        /* 4 tiles of int32 (4 KB) */
    uint8_t *stage;                      /* INT4: unpacked groups of one pair (in cbuf) */
    float *sf;                           /* INT4: sums of 32 as floats, [32][MOE_G4_MAX] (in cbuf) */
    uint8_t *abf, *bbf;                  /* INT4 through BF16 tiles: staged A chunk, B chunk of one pair */
} amx_pass;

/* ask for the 1 KB tile at p (16 lines) in L2 ahead of use: weight tiles
 * come from DRAM once per pass, the tile loads should not wait for them */
static inline void prefetch_tile(const uint8_t *p)
{
    for (int l = 0; l < 16; l++)
        _mm_prefetch((const char *)(p + l * 64), _MM_HINT_T1);
}

static void zero_tiles(int two)
{
    AMX_ZERO(0);
    AMX_ZERO(1);
    if (two) {
        AMX_ZERO(2);
        AMX_ZERO(3);
    }
}

/* the 2x2 accumulators from / to a 4 KB block (tile after tile, rows of 64 B) */
static void load_blk(int two, const uint8_t *b)
{
    AMX_LOAD(0, b, 64);
    AMX_LOAD(1, b + 1024, 64);
    if (two) {
        AMX_LOAD(2, b + 2048, 64);
        AMX_LOAD(3, b + 3072, 64);
    }
}

static void store_blk(int two, uint8_t *b)
{
    AMX_STORE(0, b, 64);
    AMX_STORE(1, b + 1024, 64);
    if (two) {
        AMX_STORE(2, b + 2048, 64);
        AMX_STORE(3, b + 3072, 64);
    }
}

/* the 2x2 accumulators into the row-major fp32 result */
static void store_c(int two, float *c, size_t ncol)
{
    AMX_STORE(0, c, ncol * 4);
    AMX_STORE(1, c + 16, ncol * 4);
    if (two) {
        AMX_STORE(2, c + 16 * ncol, ncol * 4);
        AMX_STORE(3, c + 16 * ncol + 16, ncol * 4);
    }
}

/* ask for the 1 KB tile at p in L1 (the tile load one step later hits it) */
static inline void prefetch_tile_l1(const uint8_t *p)
{
    for (int l = 0; l < 16; l++)
        _mm_prefetch((const char *)(p + l * 64), _MM_HINT_T0);
}

/* The 2x2 product over nst K steps of 64 bytes: A tiles at a0 (+ mstride
 * for the second token tile), B tiles at b0 / b1, 1 KB per step. Prefetch:
 * the first nnext tiles of the B blocks needed next (nb0 / nb1) into L2,
 * and with moe_tuning.pf bit 1 / 2 the next step's A / B tiles into L1.
 * With moe_tuning.sp the tiles of step s + 1 are loaded during step s, each
 * right after the last TDP that reads the tile it replaces (a tile load
 * waits for the TDPs before it that read its register). */
#define AMX_STEPS(DP, two, a0, mstride, b0, b1, nst, nb0, nb1, nnext, pf, sp)  \
    do {                                                                    \
        if (sp) {                                                           \
            AMX_LOAD(4, (a0), 64);                                            \
            AMX_LOAD(6, (b0), 64);                                            \
            AMX_LOAD(7, (b1), 64);                                            \
            if (two)                                                        \
                AMX_LOAD(5, (a0) + (mstride), 64);                            \
        }                                                                   \
        for (int s_ = 0; s_ < (nst); s_++) {                                \
            if (s_ < (nnext)) {                                             \
                prefetch_tile((nb0) + (size_t)s_ * 1024);                   \
                prefetch_tile((nb1) + (size_t)s_ * 1024);                   \
            }                                                               \
            const size_t o_ = (size_t)(s_ + 1 + (sp)) * 1024;               \
            if ((pf) & 1) {                                                 \
                prefetch_tile_l1((a0) + o_);                                \
                if (two)                                                    \
                    prefetch_tile_l1((a0) + (mstride) + o_);                \
            }                                                               \
            if ((pf) & 2) {                                                 \
                prefetch_tile_l1((b0) + o_);                                \
                prefetch_tile_l1((b1) + o_);                                \
            }                                                               \
            if (sp) {                                                       \
                const size_t n_ = (size_t)(s_ + 1) * 1024;                  \
                const int more_ = s_ + 1 < (nst);                           \
                DP(0, 4, 6);                                                \
                DP(1, 4, 7);                                                \
                if (more_)                                                  \
                    AMX_LOAD(4, (a0) + n_, 64);                               \
                if (two) {                                                  \
                    DP(2, 5, 6);                                            \
                    if (more_)                                              \
                        AMX_LOAD(6, (b0) + n_, 64);                           \
                    DP(3, 5, 7);                                            \
                    if (more_) {                                            \
                        AMX_LOAD(7, (b1) + n_, 64);                           \
                        AMX_LOAD(5, (a0) + (mstride) + n_, 64);               \
                    }                                                       \
                } else if (more_) {                                         \
                    AMX_LOAD(6, (b0) + n_, 64);                               \
                    AMX_LOAD(7, (b1) + n_, 64);                               \
                }                                                           \
                continue;                                                   \
            }                                                               \
            AMX_LOAD(4, (a0) + (size_t)s_ * 1024, 64);                        \
            AMX_LOAD(6, (b0) + (size_t)s_ * 1024, 64);                        \
            AMX_LOAD(7, (b1) + (size_t)s_ * 1024, 64);                        \
            DP(0, 4, 6);                                                    \
            DP(1, 4, 7);                                                    \
            if (two) {                                                      \
                AMX_LOAD(5, (a0) + (mstride) + (size_t)s_ * 1024, 64);        \
                DP(2, 5, 6);                                                \
                DP(3, 5, 7);                                                \
            }                                                               \
        }                                                                   \
    } while (0)

/* fold the int32 tiles in P->tmp (C[mm][n] at tmp + (2 mm + n) KB) into cf:
 * INT8: cf = fma(s_n, (float)(D - corr[row]), cf) */
static void fold_int8(const amx_pass *P, int mt, int two, int j, const __m512 *sc, const int32_t *corr)
{
    size_t ncol = (size_t)P->npair * 32;
    for (int mm = 0; mm < 1 + two; mm++)
        for (int r = 0; r < 16; r++) {
            int row = (mt + mm) * 16 + r;
            __m512i cr = _mm512_set1_epi32(corr[row]);
            float *c = P->cf + (size_t)row * ncol + (size_t)j * 32;
            for (int n = 0; n < 2; n++) {
                __m512i d = _mm512_load_si512(P->tmp + (size_t)(2 * mm + n) * 1024 + (size_t)r * 64);
                __m512 acc = _mm512_loadu_ps(c + n * 16);
                acc = _mm512_fmadd_ps(sc[n], _mm512_cvtepi32_ps(_mm512_sub_epi32(d, cr)), acc);
                _mm512_storeu_ps(c + n * 16, acc);
            }
        }
}

static void store_tmp(int two, uint8_t *tmp) { store_blk(two, tmp); }

static void zero_cf(const amx_pass *P)
{
    memset(P->cf, 0, (size_t)P->nmt * 16 * (size_t)P->npair * 32 * 4);
}

/* One K chunk of a BF16 or INT8 pass, for pairs [j0, j1):
 * nst steps of every pair's B from
 * byte boff of its row block, A from byte aoff of each 16-row block; the
 * accumulators start at zero (first) or from the spill, and end in the
 * spill, or (last) in cf: BF16 stored, INT8 folded with the scales at
 * soff and corr. nboff / nnext: the next chunk (B offset, steps; 0 = none).
 * moe_tuning.ord 0: pair-major (a pair's B chunk is re-read from L1/L2 by
 * every token-tile pair while A streams); 1: token-major (the A chunk of a
 * token-tile pair is reused by every pair while B streams from L2). The
 * INT4-through-bf16 pass calls it one pair at a time. */
static void run_chunk(const amx_pass *P, int j0, int j1, int int8, size_t boff, size_t aoff, int nst, int first,
                      int last, size_t nboff, int nnext, size_t soff, const int32_t *corr)
{
    int ord = MOE_TUNE.ord, pf = MOE_TUNE.pf, sp = MOE_TUNE.sp, nmt2 = (P->nmt + 1) / 2;
    int np = j1 - j0, nouter = ord ? nmt2 : np, ninner = ord ? np : nmt2;
    size_t ncol = (size_t)P->npair * 32;
    for (int o = 0; o < nouter; o++)
        for (int i = 0; i < ninner; i++) {
            int j = j0 + (ord ? i : o), m2 = ord ? o : i, mt = 2 * m2, two = mt + 1 < P->nmt;
            const uint8_t *b0 = P->b[2 * j] + boff, *b1 = P->b[2 * j + 1] + boff;
            /* the B needed next, into L2 while the first token-tile pair runs:
             * ord 0: the next pair's chunk (or pair j0's next chunk); ord 1:
             * this pair's next chunk */
            const uint8_t *nb0 = b0, *nb1 = b1;
            int nn = 0;
            if (m2 == 0) {
                if (!ord && j + 1 < j1) {
                    nb0 = P->b[2 * j + 2] + boff;
                    nb1 = P->b[2 * j + 3] + boff;
                    nn = nst;
                } else {
                    nb0 = P->b[ord ? 2 * j : 2 * j0] + nboff;
                    nb1 = P->b[ord ? 2 * j + 1 : 2 * j0 + 1] + nboff;
                    nn = nnext;
                }
            }
            uint8_t *blk = P->cbuf + ((size_t)m2 * (size_t)P->npair + (size_t)j) * 4096;
            if (first)
                zero_tiles(two);
            else
                load_blk(two, blk);
            const uint8_t *a0 = P->x + (size_t)mt * P->mstride + aoff;
            if (int8)
                AMX_STEPS(AMX_DP_SU8, two, a0, P->mstride, b0, b1, nst, nb0, nb1, nn, pf, sp);
            else
                AMX_STEPS(AMX_DP_BF16, two, a0, P->mstride, b0, b1, nst, nb0, nb1, nn, pf, sp);
            if (!last) {
                store_blk(two, blk);
            } else if (int8) {
                __m512 sc[2] = { _mm512_load_ps(P->b[2 * j] + soff), _mm512_load_ps(P->b[2 * j + 1] + soff) };
                store_tmp(two, P->tmp);
                fold_int8(P, mt, two, j, sc, corr);
            } else {
                store_c(two, P->cf + (size_t)mt * 16 * ncol + (size_t)j * 32, ncol);
            }
        }
}

/* ---- BF16: fp32 accumulation in the tiles, chunked along K ------------- */
static void pass_bf16(const amx_pass *P)
{
    int cs = MOE_TUNE.kc_bf16 / 32, nsteps = P->W->kp / 32;
    for (int st = 0; st < nsteps; st += cs) {
        int nst = nsteps - st < cs ? nsteps - st : cs, st2 = st + nst;
        int nnext = nsteps - st2 < cs ? nsteps - st2 : cs;
        run_chunk(P, 0, P->npair, 0, (size_t)st * 1024, (size_t)st * 1024, nst, st == 0, st2 == nsteps,
                  (size_t)st2 * 1024, nnext, 0, NULL);
    }
}

/* ---- INT8: int32 per scale group, chunked along K, then folded ---------- */
static void pass_int8(const amx_pass *P)
{
    const moe_mat *W = P->W;
    size_t gb = moe_int8_group_bytes(W->group);
    int sg = W->group / 64, ng = W->kp / W->group, cs = MOE_TUNE.kc_int8 / 64;
    if (cs > sg)
        cs = sg;
    int32_t corr[MOE_MC];
    zero_cf(P);
    for (int g = 0; g < ng; g++) {
        for (int r = 0; r < P->nmt * 16; r++) {
            int32_t v = 0;
            for (int i = g * W->group / 32; i < (g + 1) * W->group / 32; i++)
                v += P->s32[(size_t)r * P->lds + i];
            corr[r] = 128 * v;
        }
        for (int c0 = 0; c0 < sg; c0 += cs) {
            int nst = sg - c0 < cs ? sg - c0 : cs;
            int g2 = g, c2 = c0 + nst; /* the next chunk */
            if (c2 == sg)
                g2++, c2 = 0;
            int nnext = g2 >= ng ? 0 : sg - c2 < cs ? sg - c2 : cs;
            run_chunk(P, 0, P->npair, 1, (size_t)g * gb + (size_t)c0 * 1024, (size_t)(g * sg + c0) * 1024, nst,
                      c0 == 0, c0 + nst == sg, (size_t)g2 * gb + (size_t)c2 * 1024, nnext,
                      (size_t)g * gb + (size_t)sg * 1024, corr);
        }
    }
}

/* ---- INT4: unpacked once per pair and chunk, one 32-K group per step ---- */

/* groups [g0, g0 + ng) of pair j as int8 B tiles of 8 quad rows (nibble
 * byte c*64 + n*4 + j holds quad row c low, c + 4 high: see moe_impl.h),
 * with the fp16 scales and mins widened to fp32 */
static void unpack_int4(const amx_pass *P, int j, int g0, int ng)
{
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int gi = 0; gi < ng; gi++)
        for (int n = 0; n < 2; n++) {
            const uint8_t *src = P->b[2 * j + n] + (size_t)(g0 + gi) * 320;
            uint8_t *dst = P->stage + (size_t)gi * AMX_G4_BYTES + (size_t)n * 512;
            for (int l = 0; l < 5; l++)
                _mm_prefetch((const char *)(src + 8 * 320 + l * 64), _MM_HINT_T0);
            for (int c = 0; c < 4; c++) {
                __m512i v = _mm512_load_si512(src + c * 64);
                _mm512_store_si512(dst + c * 64, _mm512_and_si512(v, low));
                _mm512_store_si512(dst + (c + 4) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
            }
            float *f = (float *)(P->stage + (size_t)gi * AMX_G4_BYTES + 1024);
            _mm512_store_ps(f + n * 16, _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 256))));
            _mm512_store_ps(f + 32 + n * 16, _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 288))));
        }
}

/* cf += the product of pair j over groups [g0, g0 + ng) for token tiles
 * mt, mt + 1: per group, fresh int32 tiles, then for each row
 * acc = fma(m, S, fma(s, (float)D, acc)) (moe.h order) */
static void int4_block(const amx_pass *P, int mt, int two, int j, int g0, int ng)
{
    size_t ncol = (size_t)P->npair * 32;
    for (int r = 0; r < 16 * (1 + two); r++)
        for (int gi = 0; gi < ng; gi++)
            P->sf[(size_t)r * MOE_G4_MAX + gi] = (float)P->s32[(size_t)(mt * 16 + r) * P->lds + g0 + gi];
    for (int gi = 0; gi < ng; gi++) {
        int g = g0 + gi;
        const uint8_t *st = P->stage + (size_t)gi * AMX_G4_BYTES;
        const uint8_t *a = P->x + (size_t)mt * P->mstride + (size_t)(g / 2) * 1024 + (size_t)(g % 2) * 32;
        zero_tiles(two);
        AMX_LOAD(4, a, 64);
        AMX_LOAD(6, st, 64);
        AMX_LOAD(7, st + 512, 64);
        AMX_DP_SU8(0, 4, 6);
        AMX_DP_SU8(1, 4, 7);
        if (two) {
            AMX_LOAD(5, a + P->mstride, 64);
            AMX_DP_SU8(2, 5, 6);
            AMX_DP_SU8(3, 5, 7);
        }
        store_tmp(two, P->tmp);
        const float *f = (const float *)(st + 1024);
        __m512 sc[2] = { _mm512_load_ps(f), _mm512_load_ps(f + 16) };
        __m512 mn[2] = { _mm512_load_ps(f + 32), _mm512_load_ps(f + 48) };
        for (int mm = 0; mm < 1 + two; mm++)
            for (int r = 0; r < 16; r++) {
                __m512 S = _mm512_set1_ps(P->sf[(size_t)(mm * 16 + r) * MOE_G4_MAX + gi]);
                float *c = P->cf + (size_t)((mt + mm) * 16 + r) * ncol + (size_t)j * 32;
                for (int n = 0; n < 2; n++) {
                    __m512i d = _mm512_load_si512(P->tmp + (size_t)(2 * mm + n) * 1024 + (size_t)r * 64);
                    __m512 acc = _mm512_loadu_ps(c + n * 16);
                    acc = _mm512_fmadd_ps(mn[n], S, _mm512_fmadd_ps(sc[n], _mm512_cvtepi32_ps(d), acc));
                    _mm512_storeu_ps(c + n * 16, acc);
                }
            }
    }
}

static void pass_int4(const amx_pass *P)
{
    int ngr = P->W->kp / 32, gc = MOE_TUNE.g4;
    zero_cf(P);
    for (int j = 0; j < P->npair; j++)
        for (int g0 = 0; g0 < ngr; g0 += gc) {
            int ng = ngr - g0 < gc ? ngr - g0 : gc;
            unpack_int4(P, j, g0, ng);
            for (int mt = 0; mt < P->nmt; mt += 2)
                int4_block(P, mt, mt + 1 < P->nmt, j, g0, ng);
        }
}

/* ---- INT4 through BF16 tiles (moe_tuning.i4 = 1) ------------------------
 * The exact INT4 pass above is bound by its per-group folds (one fp32 fold
 * of a 32 x 32 block per 32 K, about four times the TDPs' time). This pass
 * instead stages, per K chunk, the pass's int8 activations as bf16 tiles
 * (exact: |q| <= 127) and per pair the chunk's weights dequantised to bf16,
 * w = bf16(fma(q, s, m)) (fp16 scale and min per 32-group and column), and
 * runs the BF16 chunk loop on them: the min term comes with the weights,
 * the row scale sx is applied by the caller as for INT8. Not bit-identical
 * to the reference: each weight is rounded to bf16 (relative 2^-9) and the
 * sums run in TDP order, as for BF16. */

/* A chunk [k0, k0 + nk) of every token tile: int8 tile (64 K) -> two bf16
 * tiles (32 K each); token tile mt at abf + mt * nk * 32 */
static void stage_a_i8(const amx_pass *P, int k0, int nk)
{
    for (int mt = 0; mt < P->nmt; mt++)
        for (int t8 = 0; t8 < nk / 64; t8++) {
            const uint8_t *src = P->x + (size_t)mt * P->mstride + (size_t)(k0 / 64 + t8) * 1024;
            uint8_t *dst = P->abf + (size_t)mt * (size_t)nk * 32 + (size_t)t8 * 2048;
            for (int r = 0; r < 16; r++) {
                __m512i v = _mm512_load_si512(src + r * 64);
                __m512 f[4] = { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 0))),
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))),
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))),
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))) };
                _mm512_store_si512(dst + r * 64, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
                _mm512_store_si512(dst + 1024 + r * 64, (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
            }
        }
}

/* B chunk [k0, k0 + nk) of pair j: each 32-group of a row block becomes one
 * bf16 tile (16 K-pair rows x 16 columns); block n at bbf + n * nk * 32.
 * A nibble row c (64 bytes: dword n = column n, byte j = K 4c + j low, K
 * 4c + 16 + j high) gives tile rows 2c, 2c + 1 (low) and 2c + 8, 2c + 9
 * (high). Each output row is two halves of 16 fp32 lanes (lane i: column
 * 8 * half + i / 2, K offset i % 2), which VCVTNE2PS2BF16 joins in tile
 * order, so no permute follows the conversion: one 128-bit-lane
 * broadcast (VSHUFI64X2) per half brings its columns' dwords into the
 * lanes that need them and one VPSHUFB puts each nibble, zero-extended,
 * into its fp32 lane. Values: bf16(fma(q, s, m)), q exact in fp32. */
static void stage_b_i4(const amx_pass *P, int j, int k0, int nk)
{
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i cix0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i cix1 = _mm512_add_epi32(cix0, _mm512_set1_epi32(8));
    /* VPSHUFB index for row parity e: dword d of 128-bit lane L (fp32 lane
     * 4L + d, column 2L + d / 2 of the half) takes byte 2e + d % 2 of dword
     * 2 (L % 2) + d / 2 of its lane; the other three bytes zero */
    _Alignas(64) uint8_t bix_b[2][64];
    for (int e = 0; e < 2; e++)
        for (int L = 0; L < 4; L++)
            for (int d = 0; d < 4; d++) {
                uint8_t *o = &bix_b[e][16 * L + 4 * d];
                o[0] = (uint8_t)(4 * (2 * (L % 2) + d / 2) + 2 * e + d % 2);
                o[1] = o[2] = o[3] = 0x80;
            }
    const __m512i bix[2] = { _mm512_load_si512(bix_b[0]), _mm512_load_si512(bix_b[1]) };
    for (int n = 0; n < 2; n++)
        for (int t = 0; t < nk / 32; t++) {
            const uint8_t *src = P->b[2 * j + n] + (size_t)(k0 / 32 + t) * 320;
            uint8_t *dst = P->bbf + (size_t)n * (size_t)nk * 32 + (size_t)t * 1024;
            /* the nibbles come from DRAM once per pass: ask for a group a few
             * groups ahead, so the unpack does not wait on each line in turn */
            for (int l = 0; l < 5; l++)
                _mm_prefetch((const char *)(src + AMX_I4_PFD * 320 + l * 64), _MM_HINT_T0);
            __m512 sv = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 256)));
            __m512 mv = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 288)));
            __m512 s0 = _mm512_permutexvar_ps(cix0, sv), s1 = _mm512_permutexvar_ps(cix1, sv);
            __m512 m0 = _mm512_permutexvar_ps(cix0, mv), m1 = _mm512_permutexvar_ps(cix1, mv);
            for (int c = 0; c < 4; c++) {
                __m512i v = _mm512_load_si512(src + c * 64);
                for (int h = 0; h < 2; h++) {
                    __m512i x = h ? _mm512_and_si512(_mm512_srli_epi16(v, 4), low) : _mm512_and_si512(v, low);
                    __m512i t0 = _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(1, 1, 0, 0));
                    __m512i t1 = _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(3, 3, 2, 2));
                    for (int e = 0; e < 2; e++) {
                        __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(t0, bix[e])), s0, m0);
                        __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(t1, bix[e])), s1, m1);
                        _mm512_store_si512(dst + (size_t)(2 * c + 8 * h + e) * 64, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
                    }
                }
            }
        }
}

static void pass_int4_bf16(const amx_pass *P)
{
    int kp = P->W->kp, kc = MOE_TUNE.kc_bf16 / 64 * 64;
    kc = kc < 64 ? 64 : kc > AMX_I4_KC ? AMX_I4_KC : kc;
    amx_pass S = *P; /* the same pass over the staged operands */
    for (int k0 = 0; k0 < kp; k0 += kc) {
        int nk = kp - k0 < kc ? kp - k0 : kc;
        stage_a_i8(P, k0, nk);
        S.x = P->abf;
        S.mstride = (size_t)nk * 32;
        for (int j = 0; j < P->npair; j++) {
            stage_b_i4(P, j, k0, nk);
            S.b[2 * j] = P->bbf;
            S.b[2 * j + 1] = P->bbf + (size_t)nk * 32;
            run_chunk(&S, j, j + 1, 0, 0, 0, nk / 32, k0 == 0, k0 + nk == kp, 0, 0, 0, NULL);
        }
    }
}

/* ---- FP8: E4M3 widened to bf16 tiles, one fold per 128-group ----------
 * Per group and pair the two row blocks' E4M3 lines are widened to bf16
 * (exact, moe_e4m3x32_bf16: each line gives two K-pair tile rows) into 4
 * B tiles per block; every token-tile pair then runs the 4 K steps from
 * zeroed tiles and folds cf = fma(s, D_g, cf) with the group's column
 * scales: the reference's numerics, with D_g summed in tile order (as
 * BF16). A fold of a 32 x 32 block per 128 K, a quarter of the exact INT4
 * pass's rate. */
static void stage_b_fp8(const amx_pass *P, int j, int g)
{
    const __m512i sub = _mm512_loadu_si512(moe_e4m3_sub), zero = _mm512_setzero_si512();
    for (int n = 0; n < 2; n++) {
        const uint8_t *src = P->b[2 * j + n] + (size_t)g * MOE_FP8_GBYTES;
        uint8_t *dst = P->bbf + (size_t)n * 4096;
        for (int l = 0; l < MOE_FP8_G / 4; l++) {
            __m512i v = _mm512_load_si512(src + l * 64);
            uint8_t *row = dst + (size_t)(l / 8) * 1024 + (size_t)((2 * l) % 16) * 64;
            _mm512_store_si512(row, moe_e4m3x32_bf16(_mm512_unpacklo_epi8(v, zero), sub));
            _mm512_store_si512(row + 64, moe_e4m3x32_bf16(_mm512_unpackhi_epi8(v, zero), sub));
        }
    }
}

/* cf = fma(s_n, D, cf) for the fp32 tiles in P->tmp (C[mm][n] at tmp + (2 mm + n) KB) */
static void fold_fp8(const amx_pass *P, int mt, int two, int j, const __m512 *sc)
{
    size_t ncol = (size_t)P->npair * 32;
    for (int mm = 0; mm < 1 + two; mm++)
        for (int r = 0; r < 16; r++) {
            float *c = P->cf + (size_t)((mt + mm) * 16 + r) * ncol + (size_t)j * 32;
            for (int n = 0; n < 2; n++) {
                __m512 d = _mm512_load_ps(P->tmp + (size_t)(2 * mm + n) * 1024 + (size_t)r * 64);
                _mm512_storeu_ps(c + n * 16, _mm512_fmadd_ps(sc[n], d, _mm512_loadu_ps(c + n * 16)));
            }
        }
}

static void pass_fp8(const amx_pass *P)
{
    int ng = P->W->kp / MOE_FP8_G, pf = MOE_TUNE.pf, sp = MOE_TUNE.sp;
    zero_cf(P);
    for (int g = 0; g < ng; g++)
        for (int j = 0; j < P->npair; j++) {
            stage_b_fp8(P, j, g);
            const uint8_t *b0 = P->bbf, *b1 = P->bbf + 4096;
            __m512 sc[2] = { _mm512_load_ps(P->b[2 * j] + (size_t)g * MOE_FP8_GBYTES + 2048),
                             _mm512_load_ps(P->b[2 * j + 1] + (size_t)g * MOE_FP8_GBYTES + 2048) };
            for (int mt = 0; mt < P->nmt; mt += 2) {
                int two = mt + 1 < P->nmt;
                const uint8_t *a0 = P->x + (size_t)mt * P->mstride + (size_t)g * 4096;
                zero_tiles(two);
                AMX_STEPS(AMX_DP_BF16, two, a0, P->mstride, b0, b1, 4, b0, b1, 0, pf, sp);
                store_tmp(two, P->tmp);
                fold_fp8(P, mt, two, j, sc);
            }
        }
}

static void run_pass(int fmt, const amx_pass *P)
{
    if (fmt == MOE_BF16)
        pass_bf16(P);
    else if (fmt == MOE_FP8)
        pass_fp8(P);
    else if (fmt == MOE_INT8)
        pass_int8(P);
    else if (MOE_TUNE.i4)
        pass_int4_bf16(P);
    else
        pass_int4(P);
}

/* carve the thread's scratch: result | spill (INT4: staging, sums) | tmp |
 * INT4 through BF16: A chunk | B chunk */
static void pass_bufs(amx_pass *P, void *ts)
{
    uint8_t *t = ts;
    P->cf = (float *)t;
    P->cbuf = t + AMX_CF_BYTES;
    P->stage = P->cbuf;
    P->sf = (float *)(P->cbuf + (size_t)MOE_G4_MAX * AMX_G4_BYTES);
    P->tmp = t + 2 * AMX_CF_BYTES;
    P->abf = P->tmp + 4096;
    P->bbf = P->abf + AMX_I4A_BYTES;
}

/* tiled activation rows [mt0*16, ...) of a as a pass's A operand */
static void pass_rows(amx_pass *P, int fmt, const moe_act *a, int mt0, int nmt)
{
    size_t esz = moe_act_bf16(fmt) ? 2 : 1;
    P->nmt = nmt;
    P->mstride = 16 * a->ld * esz;
    P->x = (const uint8_t *)a->x + (size_t)mt0 * P->mstride;
    P->lds = a->lds;
    P->s32 = moe_act_bf16(fmt) ? NULL : a->s32 + (size_t)mt0 * 16 * a->lds;
}

/* Phase 1. Writes h for every row of the 16-row tiles, padding rows included
 * (their activations are zero, so h is 0): phase 2 tiles read them. BF16 h
 * is written tiled (h = the slice's first tile), fp32 h row-major. */
static void amx_up(int fmt, const moe_mat *g, const moe_mat *u, int rb0, int rb1, const moe_act *a, void *h,
                   size_t ldh, void *ts)
{
    TD_ASSERT(ts != NULL && rb1 - rb0 <= MOE_MAXPAIR && rb1 > rb0);
    amx_pass P;
    pass_bufs(&P, ts);
    P.W = g;
    P.npair = rb1 - rb0;
    for (int j = 0; j < P.npair; j++) {
        P.b[2 * j] = g->w + (size_t)(rb0 + j) * g->rb_bytes;
        P.b[2 * j + 1] = u->w + (size_t)(rb0 + j) * u->rb_bytes;
    }
    size_t ncol = (size_t)P.npair * 32;
    int mtiles = (a->m + 15) / 16, mcs = MOE_TUNE.mc / 16;
    amx_config(fmt == MOE_INT4 && !MOE_TUNE.i4);
    for (int mt0 = 0; mt0 < mtiles; mt0 += mcs) {
        int nmt = mtiles - mt0 < mcs ? mtiles - mt0 : mcs;
        pass_rows(&P, fmt, a, mt0, nmt);
        run_pass(fmt, &P);
        for (int r = 0; r < nmt * 16; r++) {
            int row = mt0 * 16 + r;
            __m512 sx = _mm512_set1_ps(moe_act_bf16(fmt) ? 1.0f : a->sx[row]);
            for (int j = 0; j < P.npair; j++) {
                __m512 gv = _mm512_loadu_ps(P.cf + (size_t)r * ncol + (size_t)j * 32);
                __m512 uv = _mm512_loadu_ps(P.cf + (size_t)r * ncol + (size_t)j * 32 + 16);
                uint8_t *dst;
                if (moe_act_bf16(fmt)) {
                    int c = (rb0 + j) * 16;
                    dst = (uint8_t *)h + (size_t)(row / 16) * 16 * ldh * 2 + (size_t)(c / 32) * 1024 +
                          (size_t)(row % 16) * 64 + (size_t)(c % 32) * 2;
                } else {
                    gv = _mm512_mul_ps(sx, gv);
                    uv = _mm512_mul_ps(sx, uv);
                    dst = (uint8_t *)h + ((size_t)row * ldh + (size_t)(rb0 + j) * 16) * 4;
                }
                moe_store_h512(fmt, dst, gv, uv);
            }
        }
    }
    AMX_RELEASE();
}

/* Phase 2: column blocks in pairs (down has an even number of row blocks). */
static void amx_down(int fmt, const moe_mat *d, int rb0, int rb1, const moe_act *a, const int32_t *tok,
                     const float *wt, float *out, size_t ldo, int ncols, void *ts)
{
    TD_ASSERT(ts != NULL && rb0 % 2 == 0 && d->nrb % 2 == 0 && rb1 > rb0);
    if (rb1 % 2)
        rb1++;
    TD_ASSERT(rb1 <= d->nrb && (rb1 - rb0) / 2 <= MOE_MAXPAIR);
    amx_pass P;
    pass_bufs(&P, ts);
    P.W = d;
    P.npair = (rb1 - rb0) / 2;
    for (int j = 0; j < 2 * P.npair; j++)
        P.b[j] = d->w + (size_t)(rb0 + j) * d->rb_bytes;
    size_t ncol = (size_t)P.npair * 32;
    int mtiles = (a->m + 15) / 16, mcs = MOE_TUNE.mc / 16;
    amx_config(fmt == MOE_INT4 && !MOE_TUNE.i4);
    for (int mt0 = 0; mt0 < mtiles; mt0 += mcs) {
        int nmt = mtiles - mt0 < mcs ? mtiles - mt0 : mcs;
        pass_rows(&P, fmt, a, mt0, nmt);
        run_pass(fmt, &P);
        int nrow = a->m - mt0 * 16 < nmt * 16 ? a->m - mt0 * 16 : nmt * 16;
        for (int r = 0; r < nrow; r++) {
            int row = mt0 * 16 + r;
            __m512 sx = _mm512_set1_ps(moe_act_bf16(fmt) ? 1.0f : a->sx[row]);
            for (int j = 0; j < 2 * P.npair; j++) {
                int col0 = (rb0 + j) * 16;
                if (col0 >= ncols)
                    break;
                __m512 y = _mm512_loadu_ps(P.cf + (size_t)r * ncol + (size_t)j * 16);
                if (!moe_act_bf16(fmt))
                    y = _mm512_mul_ps(sx, y);
                moe_acc_out512(out + (size_t)tok[row] * ldo, col0, ncols, wt[row], y);
            }
        }
    }
    AMX_RELEASE();
}

static int amx_accepts(int fmt, int group)
{
    (void)fmt;
    (void)group;
    return 1;
}

const moe_kernel AMX_KERNEL = { AMX_KNAME, ISA_AMX, amx_accepts, amx_up, amx_down, 1 };
