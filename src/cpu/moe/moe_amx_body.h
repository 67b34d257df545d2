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
 * Tiles: 0..3 accumulators, C[mt][n] = tile 2*mt + n (mt: which of two
 * 16-row token tiles, n: which of two 16-column weight blocks), 4/5 the two
 * A (token) tiles, 6/7 the two B (weight) tiles. Weight tiles are loaded
 * straight from the packed layout, which is already the VNNI B layout
 * (BF16: 16 K-pair rows x 16 columns; INT8: 16 K-quad rows). INT4 uses K
 * steps of 32 (A 32 bytes wide, B 8 quad rows) and unpacks each step's
 * nibbles into a 1 KB staging buffer.
 *
 * One pass = up to MOE_MC token rows x npair column-block pairs (gate/up of
 * the same rows in phase 1, two neighbouring down blocks in phase 2). BF16
 * accumulates in the tiles over K chunks of AMX_KC (the chunk's B, 2 x 16 KB,
 * stays in L1 across the token tiles), spilling fp32 C to the pass buffer
 * between chunks. INT8/INT4 accumulate int32 per scale group, then fold it
 * into the fp32 buffer exactly as moe.h states (fma(s, D, acc) per group, in
 * order; INT8 removes the 128 offset with the activation sums), so the
 * result is bit-identical to the reference.
 */
#ifndef AMX_KERNEL
#error "define the tile-operation macros and AMX_KERNEL before including moe_amx_body.h"
#endif

#include "cpu/moe/moe_simd512.h"
#include "core/err.h"
#include "core/isa.h"

#define AMX_KC 512                 /* K per chunk (elements) for BF16 */
#define AMX_MAXPAIR MOE_UP_BIG_RB  /* column-block pairs per pass */

typedef struct {
    uint8_t palette, start_row, rsv[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

_Static_assert(sizeof(amx_tilecfg) == 64, "the tile configuration is 64 bytes");
_Static_assert((size_t)MOE_MC * AMX_MAXPAIR * 32 * 4 * 2 + 4096 + 1024 <= MOE_TSCRATCH,
               "per-thread scratch too small for a pass");

static void amx_config(int int4)
{
    amx_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 4; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    for (int t = 4; t < 6; t++) {
        c.rows[t] = 16;
        c.colsb[t] = int4 ? 32 : 64;
    }
    for (int t = 6; t < 8; t++) {
        c.rows[t] = int4 ? 8 : 16;
        c.colsb[t] = 64;
    }
    AMX_CFG(&c);
}

typedef struct {
    const moe_mat *W;                    /* layout of the weight blocks */
    const uint8_t *b[2 * AMX_MAXPAIR];   /* pair j: row-block bases b[2j], b[2j+1] */
    int npair;
    const uint8_t *x;                    /* activation row 0 of the pass */
    size_t ldx;                          /* bytes between activation rows */
    const int32_t *s32;                  /* INT: sums of 32 of row 0, stride lds */
    size_t lds;
    int nmt;                             /* 16-row token tiles (1..MOE_MC/16) */
    float *cf;                           /* [nmt*16][npair*32] fp32 result */
    int32_t *ci;                         /* INT8: int32 spill, same shape */
    uint8_t *tmp;                        /* 4 tiles of int32 (4 KB) */
    uint8_t *stage;                      /* INT4: two unpacked B tiles (1 KB) */
} amx_pass;

/* ask for the 1 KB tile at p (16 lines) in L2 ahead of use: weight tiles
 * come from DRAM once per chunk, the tile loads should not wait for them */
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

static void load_c(int two, const void *c, size_t ncol)
{
    const float *p = c;
    AMX_LOAD(0, p, ncol * 4);
    AMX_LOAD(1, p + 16, ncol * 4);
    if (two) {
        AMX_LOAD(2, p + 16 * ncol, ncol * 4);
        AMX_LOAD(3, p + 16 * ncol + 16, ncol * 4);
    }
}

static void store_c(int two, void *c, size_t ncol)
{
    float *p = c;
    AMX_STORE(0, p, ncol * 4);
    AMX_STORE(1, p + 16, ncol * 4);
    if (two) {
        AMX_STORE(2, p + 16 * ncol, ncol * 4);
        AMX_STORE(3, p + 16 * ncol + 16, ncol * 4);
    }
}

/* ---- BF16: fp32 accumulation in the tiles, chunked along K ------------- */
static void pass_bf16(const amx_pass *P)
{
    size_t ncol = (size_t)P->npair * 32;
    int kp = P->W->kp;
    for (int kc0 = 0; kc0 < kp; kc0 += AMX_KC) {
        int nst = (kp - kc0 < AMX_KC ? kp - kc0 : AMX_KC) / 32;
        for (int j = 0; j < P->npair; j++) {
            const uint8_t *b0 = P->b[2 * j] + (size_t)(kc0 / 32) * 1024;
            const uint8_t *b1 = P->b[2 * j + 1] + (size_t)(kc0 / 32) * 1024;
            for (int mt = 0; mt < P->nmt; mt += 2) {
                int two = mt + 1 < P->nmt;
                float *c = P->cf + (size_t)mt * 16 * ncol + (size_t)j * 32;
                if (kc0 == 0)
                    zero_tiles(two);
                else
                    load_c(two, c, ncol);
                const uint8_t *a = P->x + (size_t)mt * 16 * P->ldx + (size_t)kc0 * 2;
                for (int s = 0; s < nst; s++) {
                    if (mt == 0 && kc0 + AMX_KC < kp) { /* the next chunk's tiles */
                        prefetch_tile(b0 + (size_t)(AMX_KC / 32 + s) * 1024);
                        prefetch_tile(b1 + (size_t)(AMX_KC / 32 + s) * 1024);
                    }
                    AMX_LOAD(4, a + (size_t)s * 64, P->ldx);
                    AMX_LOAD(6, b0 + (size_t)s * 1024, 64);
                    AMX_LOAD(7, b1 + (size_t)s * 1024, 64);
                    AMX_DP_BF16(0, 4, 6);
                    AMX_DP_BF16(1, 4, 7);
                    if (two) {
                        AMX_LOAD(5, a + 16 * P->ldx + (size_t)s * 64, P->ldx);
                        AMX_DP_BF16(2, 5, 6);
                        AMX_DP_BF16(3, 5, 7);
                    }
                }
                store_c(two, c, ncol);
            }
        }
    }
}

/* fold the int32 tiles in P->tmp (C[mm][n] at tmp + (2 mm + n) KB) into cf:
 * INT8: cf = fma(s_n, (float)(D - corr[row]), cf); INT4: cf = fma(m_n, S_row,
 * fma(s_n, (float)D, cf)) */
static void flush(const amx_pass *P, int mt, int two, int j, const __m512 *sc, const __m512 *mn, const int32_t *corr,
                  int blk)
{
    size_t ncol = (size_t)P->npair * 32;
    for (int mm = 0; mm < 1 + two; mm++)
        for (int n = 0; n < 2; n++)
            for (int r = 0; r < 16; r++) {
                int row = (mt + mm) * 16 + r;
                __m512i d = _mm512_load_si512(P->tmp + (size_t)(2 * mm + n) * 1024 + (size_t)r * 64);
                float *c = P->cf + (size_t)row * ncol + (size_t)j * 32 + (size_t)n * 16;
                __m512 acc = _mm512_loadu_ps(c);
                if (mn == NULL) {
                    d = _mm512_sub_epi32(d, _mm512_set1_epi32(corr[row]));
                    acc = _mm512_fmadd_ps(sc[n], _mm512_cvtepi32_ps(d), acc);
                } else {
                    __m512 S = _mm512_set1_ps((float)P->s32[(size_t)row * P->lds + blk]);
                    acc = _mm512_fmadd_ps(mn[n], S, _mm512_fmadd_ps(sc[n], _mm512_cvtepi32_ps(d), acc));
                }
                _mm512_storeu_ps(c, acc);
            }
}

static void store_tmp(int two, uint8_t *tmp)
{
    AMX_STORE(0, tmp, 64);
    AMX_STORE(1, tmp + 1024, 64);
    if (two) {
        AMX_STORE(2, tmp + 2048, 64);
        AMX_STORE(3, tmp + 3072, 64);
    }
}

static void zero_cf(const amx_pass *P)
{
    memset(P->cf, 0, (size_t)P->nmt * 16 * (size_t)P->npair * 32 * 4);
}

/* ---- INT8: int32 per scale group (chunks of <= 8 K-steps), then folded -- */
static void pass_int8(const amx_pass *P)
{
    const moe_mat *W = P->W;
    size_t ncol = (size_t)P->npair * 32, gb = moe_int8_group_bytes(W->group);
    int sg = W->group / 64, cs = 8;
    while (sg % cs)
        cs--;
    int32_t corr[MOE_MC];
    zero_cf(P);
    for (int g = 0; g < W->kp / W->group; g++) {
        for (int r = 0; r < P->nmt * 16; r++) {
            int32_t v = 0;
            for (int i = g * W->group / 32; i < (g + 1) * W->group / 32; i++)
                v += P->s32[(size_t)r * P->lds + i];
            corr[r] = 128 * v;
        }
        for (int c0 = 0; c0 < sg; c0 += cs) {
            int first = c0 == 0, last = c0 + cs == sg;
            for (int j = 0; j < P->npair; j++) {
                const uint8_t *b0 = P->b[2 * j] + (size_t)g * gb + (size_t)c0 * 1024;
                const uint8_t *b1 = P->b[2 * j + 1] + (size_t)g * gb + (size_t)c0 * 1024;
                __m512 sc[2] = { _mm512_load_ps(P->b[2 * j] + (size_t)g * gb + (size_t)sg * 1024),
                                 _mm512_load_ps(P->b[2 * j + 1] + (size_t)g * gb + (size_t)sg * 1024) };
                for (int mt = 0; mt < P->nmt; mt += 2) {
                    int two = mt + 1 < P->nmt;
                    int32_t *ci = P->ci + (size_t)mt * 16 * ncol + (size_t)j * 32;
                    if (first)
                        zero_tiles(two);
                    else
                        load_c(two, ci, ncol);
                    const uint8_t *a = P->x + (size_t)mt * 16 * P->ldx + (size_t)g * W->group + (size_t)c0 * 64;
                    for (int s = 0; s < cs; s++) {
                        if (mt == 0) { /* the next chunk's tiles (across a group end: 64 B early) */
                            prefetch_tile(b0 + (size_t)(cs + s) * 1024);
                            prefetch_tile(b1 + (size_t)(cs + s) * 1024);
                        }
                        AMX_LOAD(4, a + (size_t)s * 64, P->ldx);
                        AMX_LOAD(6, b0 + (size_t)s * 1024, 64);
                        AMX_LOAD(7, b1 + (size_t)s * 1024, 64);
                        AMX_DP_SU8(0, 4, 6);
                        AMX_DP_SU8(1, 4, 7);
                        if (two) {
                            AMX_LOAD(5, a + 16 * P->ldx + (size_t)s * 64, P->ldx);
                            AMX_DP_SU8(2, 5, 6);
                            AMX_DP_SU8(3, 5, 7);
                        }
                    }
                    if (last) {
                        store_tmp(two, P->tmp);
                        flush(P, mt, two, j, sc, NULL, corr, g);
                    } else {
                        store_c(two, ci, ncol);
                    }
                }
            }
        }
    }
}

/* ---- INT4: one 32-K group per step, unpacked to u8 B tiles, folded ----- */
static void pass_int4(const amx_pass *P)
{
    const __m512i low = _mm512_set1_epi8(0x0f);
    zero_cf(P);
    for (int blk = 0; blk < P->W->kp / 32; blk++)
        for (int j = 0; j < P->npair; j++) {
            __m512 sc[2], mn[2];
            for (int n = 0; n < 2; n++) {
                const uint8_t *src = P->b[2 * j + n] + (size_t)blk * 320;
                uint8_t *dst = P->stage + n * 512;
                for (int c = 0; c < 4; c++) {
                    __m512i v = _mm512_load_si512(src + c * 64);
                    _mm512_store_si512(dst + c * 64, _mm512_and_si512(v, low));
                    _mm512_store_si512(dst + (c + 4) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
                }
                sc[n] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 256)));
                mn[n] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(src + 288)));
            }
            AMX_LOAD(6, P->stage, 64);
            AMX_LOAD(7, P->stage + 512, 64);
            for (int mt = 0; mt < P->nmt; mt += 2) {
                int two = mt + 1 < P->nmt;
                const uint8_t *a = P->x + (size_t)mt * 16 * P->ldx + (size_t)blk * 32;
                zero_tiles(two);
                AMX_LOAD(4, a, P->ldx);
                AMX_DP_SU8(0, 4, 6);
                AMX_DP_SU8(1, 4, 7);
                if (two) {
                    AMX_LOAD(5, a + 16 * P->ldx, P->ldx);
                    AMX_DP_SU8(2, 5, 6);
                    AMX_DP_SU8(3, 5, 7);
                }
                store_tmp(two, P->tmp);
                flush(P, mt, two, j, sc, mn, NULL, blk);
            }
        }
}

static void run_pass(int fmt, const amx_pass *P)
{
    if (fmt == MOE_BF16)
        pass_bf16(P);
    else if (fmt == MOE_INT8)
        pass_int8(P);
    else
        pass_int4(P);
}

/* carve the thread's scratch */
static void pass_bufs(amx_pass *P, void *ts)
{
    uint8_t *t = ts;
    size_t cbytes = (size_t)MOE_MC * AMX_MAXPAIR * 32 * 4;
    P->cf = (float *)t;
    P->ci = (int32_t *)(t + cbytes);
    P->tmp = t + 2 * cbytes;
    P->stage = t + 2 * cbytes + 4096;
}

/* activation rows [mt0*16, ...) of a as a pass's A operand */
static void pass_rows(amx_pass *P, int fmt, const moe_act *a, int mt0, int nmt)
{
    size_t esz = fmt == MOE_BF16 ? 2 : 1;
    P->nmt = nmt;
    P->ldx = a->ld * esz;
    P->x = (const uint8_t *)a->x + (size_t)mt0 * 16 * P->ldx;
    P->lds = a->lds;
    P->s32 = fmt == MOE_BF16 ? NULL : a->s32 + (size_t)mt0 * 16 * a->lds;
}

/* Phase 1. Writes h for every row of the 16-row tiles, padding rows included
 * (their activations are zero, so h is 0): phase 2 tiles read them. */
static void amx_up(int fmt, const moe_mat *g, const moe_mat *u, int rb0, int rb1, const moe_act *a, void *h,
                   size_t ldh, void *ts)
{
    TD_ASSERT(ts != NULL && rb1 - rb0 <= AMX_MAXPAIR && rb1 > rb0);
    amx_pass P;
    pass_bufs(&P, ts);
    P.W = g;
    P.npair = rb1 - rb0;
    for (int j = 0; j < P.npair; j++) {
        P.b[2 * j] = g->w + (size_t)(rb0 + j) * g->rb_bytes;
        P.b[2 * j + 1] = u->w + (size_t)(rb0 + j) * u->rb_bytes;
    }
    size_t ncol = (size_t)P.npair * 32, hsz = fmt == MOE_BF16 ? 2 : 4;
    int mtiles = (a->m + 15) / 16;
    amx_config(fmt == MOE_INT4);
    for (int mt0 = 0; mt0 < mtiles; mt0 += MOE_MC / 16) {
        int nmt = mtiles - mt0 < MOE_MC / 16 ? mtiles - mt0 : MOE_MC / 16;
        pass_rows(&P, fmt, a, mt0, nmt);
        run_pass(fmt, &P);
        for (int r = 0; r < nmt * 16; r++) {
            int row = mt0 * 16 + r;
            __m512 sx = _mm512_set1_ps(fmt == MOE_BF16 ? 1.0f : a->sx[row]);
            for (int j = 0; j < P.npair; j++) {
                __m512 gv = _mm512_loadu_ps(P.cf + (size_t)r * ncol + (size_t)j * 32);
                __m512 uv = _mm512_loadu_ps(P.cf + (size_t)r * ncol + (size_t)j * 32 + 16);
                if (fmt != MOE_BF16) {
                    gv = _mm512_mul_ps(sx, gv);
                    uv = _mm512_mul_ps(sx, uv);
                }
                moe_store_h512(fmt, (uint8_t *)h + ((size_t)row * ldh + (size_t)(rb0 + j) * 16) * hsz, gv, uv);
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
    TD_ASSERT(rb1 <= d->nrb && (rb1 - rb0) / 2 <= AMX_MAXPAIR);
    amx_pass P;
    pass_bufs(&P, ts);
    P.W = d;
    P.npair = (rb1 - rb0) / 2;
    for (int j = 0; j < 2 * P.npair; j++)
        P.b[j] = d->w + (size_t)(rb0 + j) * d->rb_bytes;
    size_t ncol = (size_t)P.npair * 32;
    int mtiles = (a->m + 15) / 16;
    amx_config(fmt == MOE_INT4);
    for (int mt0 = 0; mt0 < mtiles; mt0 += MOE_MC / 16) {
        int nmt = mtiles - mt0 < MOE_MC / 16 ? mtiles - mt0 : MOE_MC / 16;
        pass_rows(&P, fmt, a, mt0, nmt);
        run_pass(fmt, &P);
        int nrow = a->m - mt0 * 16 < nmt * 16 ? a->m - mt0 * 16 : nmt * 16;
        for (int r = 0; r < nrow; r++) {
            int row = mt0 * 16 + r;
            __m512 sx = _mm512_set1_ps(fmt == MOE_BF16 ? 1.0f : a->sx[row]);
            for (int j = 0; j < 2 * P.npair; j++) {
                int col0 = (rb0 + j) * 16;
                if (col0 >= ncols)
                    break;
                __m512 y = _mm512_loadu_ps(P.cf + (size_t)r * ncol + (size_t)j * 16);
                if (fmt != MOE_BF16)
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

const moe_kernel AMX_KERNEL = { AMX_KNAME, ISA_AMX, amx_accepts, amx_up, amx_down };
