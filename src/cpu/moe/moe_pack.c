/*
 * moe_pack.c - packing and quantisation of expert weights into the layout of
 * moe_impl.h. Portable C: packing runs once at load, spread over the pool by
 * moe_create() one row block at a time (each call writes only its block).
 *
 * Invariants: padding (rows past N, columns past K) is zero, so padded h
 * columns come out exactly 0 and padded activations meet zero weights.
 * Quantisation scales are computed over the FULL source row (INT8 whole-row
 * scale) or over full-row groups, never over a partition slice, so the packed
 * values do not depend on how d_ff is split across partitions.
 * Every source dtype (bf16, f32, f16, FP8 with block scales, symmetric INT4
 * with bf16 group scales, a row callback) is read one source row at a time
 * into fp32 staging for the 16 rows of the block being packed; a whole
 * matrix is never widened. Two sources are copied instead, bit for bit:
 * FP8 into FP8 and symmetric INT4 into INT4 (moe.h, numerics).
 */
#include "cpu/moe/moe_impl.h"

#include <math.h>
#include <stdlib.h>

uint16_t moe_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u);              /* NaN */
    if (a >= 0x477ff000u)
        return (uint16_t)(sign | 0x7c00u);              /* rounds past 65504: inf */
    if (a < 0x38800000u) {                               /* below 2^-14: subnormal half */
        if (a < 0x33000000u)
            return (uint16_t)sign;                       /* under half the smallest: 0 */
        uint32_t man = (a & 0x7fffffu) | 0x800000u;
        int e = (int)(a >> 23);                          /* 102..112 */
        int shift = 126 - e;                             /* 14..24 */
        uint32_t h = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((a - 0x38000000u) >> 13);              /* rebias 127 -> 15 */
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
        h++;
    return (uint16_t)(sign | h);
}

/* Integer rounding (no libm call: packing quantises every weight once):
 * normal results round the fp32 mantissa to 3 bits by adding half an ulp
 * (plus the kept bit, for ties to even) and rebias the exponent; below
 * 2^-6 the step is 2^-9 and adding 2^23 to x * 512 rounds to the integer
 * (RNE, the default rounding mode). */
uint8_t moe_f32_to_e4m3(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint8_t)(sign | 0x7f);                   /* NaN */
    if (a >= 0x43e00000u)
        return (uint8_t)(sign | 0x7e);                   /* >= 448 (inf too): saturate */
    if (a < 0x3c800000u) {                               /* below 2^-6: subnormal (8 -> 2^-6, code 0x08) */
        float x;
        memcpy(&x, &a, 4);
        volatile float big = 8388608.0f;                 /* kept from being folded away */
        return (uint8_t)(sign | (int)((x * 512.0f + big) - big));
    }
    uint32_t r = (a + 0x7ffffu + ((a >> 20) & 1)) >> 20; /* fp32 exponent * 8 + 3-bit mantissa, rounded */
    r -= (127 - 7) << 3;
    return (uint8_t)(sign | (r > 0x7e ? 0x7e : r));
}

/* The mapping from a packed (row n, column k) to the source: returns 0 for
 * padding. which 0/1: rows are d_ff (slice), columns d_model; 2: rows d_model,
 * columns the d_ff slice. Source rows are read a row (or a row's slice) at a
 * time into fp32, so no source dtype is ever widened as a whole matrix. */
typedef struct {
    const void *m;
    int src;
    size_t ld;          /* source row length */
    int row0, nrow;     /* source rows [row0, row0 + nrow) are real */
    int col0, ncol;     /* source columns [col0, col0 + ncol) are real */
    int full_cols;      /* columns of the full source row (for whole-row scales) */
    const float *scale; /* FP8: [ceil(rows / bn)][nbk] block scales of the full matrix */
    int bn, bk, nbk;
    const uint16_t *scale16; /* I4SYM: [rows][nbk] bf16 scales of 32-groups (bk = 32) */
    size_t ldw;         /* I4SYM: int32 words per source row */
    const moe_desc *d;  /* FN: the callback */
    int expert, which;
} src_view;

static src_view view_of(const struct moe_op *op, const moe_src_exp *s, int p, int e, int which)
{
    src_view v;
    memset(&v, 0, sizeof v);
    v.src = s->src;
    v.d = s->d;
    v.expert = e;
    v.which = which;
    const moe_slice *sl = &op->sl[p];
    if (which < 2) {
        v.m = which == 0 ? s->gate : s->up;
        v.ld = (size_t)op->d_model;
        v.row0 = sl->lo;
        v.nrow = sl->hi - sl->lo;
        v.col0 = 0;
        v.ncol = op->d_model;
        v.full_cols = op->d_model;
    } else {
        v.m = s->down;
        v.ld = (size_t)op->d_ff;
        v.row0 = 0;
        v.nrow = op->d_model;
        v.col0 = sl->lo;
        v.ncol = sl->hi - sl->lo;
        v.full_cols = op->d_ff;
    }
    if (v.src == MOE_SRC_FP8) {
        v.scale = which == 0 ? s->d->gate_scale[e] : which == 1 ? s->d->up_scale[e] : s->d->down_scale[e];
        v.bn = s->d->block_n;
        v.bk = s->d->block_k;
        v.nbk = (v.full_cols + v.bk - 1) / v.bk;
    }
    if (v.src == MOE_SRC_I4SYM) {
        v.scale16 = which == 0   ? s->d->gate_scale_bf16[e]
                    : which == 1 ? s->d->up_scale_bf16[e]
                                 : s->d->down_scale_bf16[e];
        v.bn = 1;
        v.bk = MOE_I4SYM_GROUP;
        v.nbk = (v.full_cols + MOE_I4SYM_GROUP - 1) / MOE_I4SYM_GROUP;
        v.ldw = ((size_t)v.full_cols + 7) / 8;
    }
    return v;
}

/* I4SYM: the stored nibble u = q + 8 of source (row r, column c) */
static int i4sym_u(const src_view *v, int r, int c)
{
    uint32_t w = ((const uint32_t *)v->m)[(size_t)r * v->ldw + (size_t)(c / 8)];
    return (int)((w >> (4 * (c % 8))) & 15u);
}

/* out[0..n) = source row r (full-matrix coordinates), columns [c0, c0 + n),
 * as fp32: bf16 / f16 widened exactly, FP8 as fp8e4m3_to_f32(q) * scale of
 * the (r, c) block in fp32, I4SYM as q * scale (exact: a 4-bit integer times
 * a bf16), FN from the callback (one call) */
static void read_row(const src_view *v, int r, int c0, int n, float *out)
{
    if (n <= 0)
        return;
    size_t base = (size_t)r * v->ld + (size_t)c0;
    switch (v->src) {
    case MOE_SRC_BF16:
        for (int k = 0; k < n; k++)
            out[k] = bf16_to_f32(((const uint16_t *)v->m)[base + (size_t)k]);
        break;
    case MOE_SRC_F32:
        memcpy(out, (const float *)v->m + base, (size_t)n * sizeof(float));
        break;
    case MOE_SRC_F16:
        for (int k = 0; k < n; k++)
            out[k] = f16_to_f32(((const uint16_t *)v->m)[base + (size_t)k]);
        break;
    case MOE_SRC_FP8: {
        const uint8_t *q = (const uint8_t *)v->m + base;
        const float *srow = v->scale + (size_t)(r / v->bn) * (size_t)v->nbk;
        for (int k = 0; k < n;) {
            int c = c0 + k, end = (c / v->bk + 1) * v->bk - c0; /* to the end of this column block */
            float sc = srow[c / v->bk];
            for (end = end < n ? end : n; k < end; k++)
                out[k] = fp8e4m3_to_f32(q[k]) * sc;
        }
        break;
    }
    case MOE_SRC_I4SYM: {
        const uint16_t *srow = v->scale16 + (size_t)r * (size_t)v->nbk;
        for (int k = 0; k < n; k++) {
            int c = c0 + k;
            out[k] = (float)(i4sym_u(v, r, c) - 8) * bf16_to_f32(srow[c / MOE_I4SYM_GROUP]);
        }
        break;
    }
    default:
        v->d->src_rows(v->d->src_user, v->m, v->expert, v->which, r, c0, n, out);
        break;
    }
}

static float amax_of(const float *x, int n)
{
    float a = 0.0f;
    for (int k = 0; k < n; k++) {
        float y = fabsf(x[k]);
        a = y > a ? y : a;
    }
    return a;
}

/* The 16 rows of row block rb as floats, zero padded: rows[n * kp + k].
 * With amax non-NULL, amax[n] = max |x| over the FULL source row n (0 for
 * padding rows): when the view is a slice of the row (down, several
 * partitions) the whole row is read once into tmp [full_cols] and the slice
 * copied from it, so each source row is read once. */
static void stage_rows(const src_view *v, int rb, int kp, float *rows, float *amax, float *tmp)
{
    for (int n = 0; n < 16; n++) {
        float *r = rows + (size_t)n * kp;
        int row = rb * 16 + n, k = 0;
        if (amax)
            amax[n] = 0.0f;
        if (row < v->nrow) {
            k = v->ncol < kp ? v->ncol : kp;
            if (amax && v->ncol < v->full_cols) {
                read_row(v, v->row0 + row, 0, v->full_cols, tmp);
                amax[n] = amax_of(tmp, v->full_cols);
                memcpy(r, tmp + v->col0, (size_t)k * sizeof(float));
            } else {
                read_row(v, v->row0 + row, v->col0, k, r);
                if (amax)
                    amax[n] = amax_of(r, k);
            }
        }
        for (; k < kp; k++)
            r[k] = 0.0f;
    }
}

/* BF16 from BF16 copies the pairs; any other source is staged to fp32 first
 * and rounded to bf16 (RNE) */
static void pack_bf16(const src_view *v, const float *rows, int rb, int kp, uint8_t *dst)
{
    uint16_t *o = (uint16_t *)dst;
    for (int t = 0; t < kp / 32; t++)
        for (int r = 0; r < 16; r++)
            for (int n = 0; n < 16; n++) {
                int row = rb * 16 + n, k = t * 32 + 2 * r;
                if (!rows) {
                    o[0] = o[1] = 0;
                    if (row < v->nrow && k < v->ncol) {
                        const uint16_t *s = (const uint16_t *)v->m + (size_t)(v->row0 + row) * v->ld + v->col0 + k;
                        o[0] = s[0];
                        o[1] = k + 1 < v->ncol ? s[1] : 0;
                    }
                } else {
                    o[0] = f32_to_bf16(rows[(size_t)n * kp + (size_t)k]);
                    o[1] = f32_to_bf16(rows[(size_t)n * kp + (size_t)k + 1]);
                }
                o += 2;
            }
}

/* whole_row: one scale per row from row_amax (the full source row); else
 * per group, from the staged group (slices start on a group boundary, so a
 * group never straddles two partitions) */
static void pack_int8(const src_view *v, int rb, int kp, int group, const float *row_amax, const float *rows,
                      uint8_t *dst)
{
    float inv[16];
    for (int g = 0; g < kp / group; g++) {
        uint8_t *gb = dst + (size_t)g * moe_int8_group_bytes(group);
        float *scale = (float *)(gb + (size_t)group / 64 * 1024);
        for (int n = 0; n < 16; n++) {
            float amax = 0.0f;
            if (rb * 16 + n < v->nrow)
                amax = row_amax ? row_amax[n] : amax_of(rows + (size_t)n * kp + (size_t)g * group, group);
            scale[n] = amax / 127.0f;
            inv[n] = amax > 0.0f ? 127.0f / amax : 0.0f;
        }
        for (int t = 0; t < group / 64; t++)
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    for (int j = 0; j < 4; j++) {
                        float q = nearbyintf(rows[(size_t)n * kp + (size_t)(g * group + t * 64 + 4 * r + j)] * inv[n]);
                        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
                        gb[(size_t)t * 1024 + (size_t)r * 64 + (size_t)n * 4 + (size_t)j] = (uint8_t)((int)q + 128);
                    }
    }
}

/* the float path of INT4 for row n of group b of a row block: s = (hi - lo) / 15,
 * m = lo over the row's real values, q = rint((x - m) / s) clamped to 0..15 */
static void int4_quant_row(const src_view *v, int row, int b, const float *x, uint16_t *s_out, uint16_t *m_out,
                           uint8_t *q)
{
    float lo = 0.0f, hi = 0.0f;
    int first = 1;
    for (int k = 0; k < 32; k++) {
        if (row >= v->nrow || b * 32 + k >= v->ncol)
            continue;
        if (first || x[k] < lo)
            lo = x[k];
        if (first || x[k] > hi)
            hi = x[k];
        first = 0;
    }
    uint16_t s16 = moe_f32_to_f16((hi - lo) / 15.0f), m16 = moe_f32_to_f16(lo);
    float s = f16_to_f32(s16), m = f16_to_f32(m16);
    *s_out = s16;
    *m_out = m16;
    for (int k = 0; k < 32; k++) {
        int real = row < v->nrow && b * 32 + k < v->ncol;
        float qq = s > 0.0f && real ? nearbyintf((x[k] - m) / s) : 0.0f;
        qq = qq < 0.0f ? 0.0f : qq > 15.0f ? 15.0f : qq;
        q[k] = (uint8_t)qq;
    }
}

/* the 16 x 32 nibbles of one block in the interleaved layout of moe_impl.h */
static void int4_store_q(uint8_t *blk, uint8_t q[16][32])
{
    for (int c = 0; c < 4; c++)
        for (int n = 0; n < 16; n++)
            for (int j = 0; j < 4; j++)
                blk[c * 64 + n * 4 + j] = (uint8_t)(q[n][4 * c + j] | (q[n][4 * (c + 4) + j] << 4));
}

/* INT4 from an I4SYM source, without requantising (moe.h, numerics): the
 * stored u = q + 8 is q', s = fp16(scale), m = fp16(-8 s). Padding columns of
 * a real row get u = 8 (the weight is exactly 0), padding rows s = m = 0 and
 * u = 0, as the float path gives them. A row whose s or m does not round-trip
 * through fp16 takes the float path from q * scale. Slices start on a
 * multiple of 64 (MOE_KALIGN), so packed group b is source group
 * (col0 / 32 + b). Returns the (row, group) pairs requantised. */
static int pack_int4_i4sym(const src_view *v, int rb, int kp, uint8_t *dst)
{
    int inexact = 0;
    for (int b = 0; b < kp / 32; b++) {
        uint8_t *blk = dst + (size_t)b * 320;
        uint16_t *sc = (uint16_t *)(blk + 256), *mn = (uint16_t *)(blk + 288);
        uint8_t q[16][32];
        for (int n = 0; n < 16; n++) {
            int row = rb * 16 + n, r = v->row0 + row;
            sc[n] = mn[n] = 0;
            memset(q[n], 0, 32);
            if (row >= v->nrow || b * 32 >= v->ncol)
                continue; /* a padding row, or a group past the real columns: all zero */
            int c0 = v->col0 + b * 32, nreal = v->ncol - b * 32 < 32 ? v->ncol - b * 32 : 32;
            float scale = bf16_to_f32(v->scale16[(size_t)r * (size_t)v->nbk + (size_t)(c0 / MOE_I4SYM_GROUP)]);
            uint16_t s16 = moe_f32_to_f16(scale), m16 = moe_f32_to_f16(-8.0f * scale);
            if (f16_to_f32(s16) == scale && f16_to_f32(m16) == -8.0f * scale) {
                sc[n] = s16;
                mn[n] = m16;
                for (int k = 0; k < 32; k++)
                    q[n][k] = (uint8_t)(k < nreal ? i4sym_u(v, r, c0 + k) : 8);
            } else {
                float x[32] = { 0 };
                read_row(v, r, c0, nreal, x);
                int4_quant_row(v, row, b, x, &sc[n], &mn[n], q[n]);
                inexact++;
            }
        }
        int4_store_q(blk, q);
    }
    return inexact;
}

/* INT4 from a source that gives each 32-group as s * q + m (moe_desc.src_q4,
 * GGUF Q4 blocks): q copied, s and m rounded to fp16 (moe.h, numerics).
 * Padding as pack_int4_i4sym; a group the source cannot give (or whose s or
 * m overflow fp16) takes the float path from its rows. */
static void pack_int4_q4(const src_view *v, int rb, int kp, uint8_t *dst)
{
    for (int b = 0; b < kp / 32; b++) {
        uint8_t *blk = dst + (size_t)b * 320;
        uint16_t *sc = (uint16_t *)(blk + 256), *mn = (uint16_t *)(blk + 288);
        uint8_t q[16][32];
        for (int n = 0; n < 16; n++) {
            int row = rb * 16 + n, r = v->row0 + row;
            sc[n] = mn[n] = 0;
            memset(q[n], 0, 32);
            if (row >= v->nrow || b * 32 >= v->ncol)
                continue;
            int c0 = v->col0 + b * 32, nreal = v->ncol - b * 32 < 32 ? v->ncol - b * 32 : 32;
            float s, m;
            if (nreal == 32 && v->d->src_q4(v->d->src_user, v->m, v->expert, v->which, r, c0, q[n], &s, &m)) {
                uint16_t s16 = moe_f32_to_f16(s), m16 = moe_f32_to_f16(m);
                if (isfinite(f16_to_f32(s16)) && isfinite(f16_to_f32(m16))) {
                    sc[n] = s16;
                    mn[n] = m16;
                    continue;
                }
            }
            float x[32] = { 0 };
            read_row(v, r, c0, nreal, x);
            int4_quant_row(v, row, b, x, &sc[n], &mn[n], q[n]);
        }
        int4_store_q(blk, q);
    }
}

static void pack_int4(const src_view *v, int rb, int kp, const float *rows, uint8_t *dst)
{
    for (int b = 0; b < kp / 32; b++) {
        uint8_t *blk = dst + (size_t)b * 320;
        uint16_t *sc = (uint16_t *)(blk + 256), *mn = (uint16_t *)(blk + 288);
        uint8_t q[16][32];
        for (int n = 0; n < 16; n++)
            int4_quant_row(v, rb * 16 + n, b, rows + (size_t)n * kp + (size_t)b * 32, &sc[n], &mn[n], q[n]);
        int4_store_q(blk, q);
    }
}
/* FP8 from an FP8 source whose column blocks hold whole 128-groups: the
 * E4M3 bytes and the block scales are copied, so the packed weights are the
 * checkpoint's, bit for bit. Padding: q = 0 (+0), scale 0. */
static void pack_fp8_copy(const src_view *v, int rb, int kp, uint8_t *dst)
{
    for (int g = 0; g < kp / MOE_FP8_G; g++) {
        uint8_t *gb = dst + (size_t)g * MOE_FP8_GBYTES;
        float *scale = (float *)(gb + 2048);
        memset(gb, 0, 2048);
        for (int n = 0; n < 16; n++) {
            int row = rb * 16 + n, r = v->row0 + row;
            scale[n] = 0.0f;
            if (row >= v->nrow)
                continue;
            int c0 = g * MOE_FP8_G, c1 = c0 + MOE_FP8_G < v->ncol ? c0 + MOE_FP8_G : v->ncol;
            if (c0 >= c1)
                continue;
            scale[n] = v->scale[(size_t)(r / v->bn) * (size_t)v->nbk + (size_t)((v->col0 + c0) / v->bk)];
            const uint8_t *q = (const uint8_t *)v->m + (size_t)r * v->ld + (size_t)v->col0;
            for (int k = c0; k < c1; k++)
                gb[moe_off_fp8(n, k) - (size_t)g * MOE_FP8_GBYTES] = q[k];
        }
    }
}

/* FP8 from any other source: per row and 128-group s = amax / 448 (fp32),
 * q = E4M3(x / s) rounded to nearest even and saturated (s = 0: q = 0) */
static void pack_fp8_quant(const src_view *v, int rb, int kp, const float *rows, uint8_t *dst)
{
    for (int g = 0; g < kp / MOE_FP8_G; g++) {
        uint8_t *gb = dst + (size_t)g * MOE_FP8_GBYTES;
        float *scale = (float *)(gb + 2048);
        for (int n = 0; n < 16; n++) {
            const float *x = rows + (size_t)n * kp + (size_t)g * MOE_FP8_G;
            float amax = rb * 16 + n < v->nrow ? amax_of(x, MOE_FP8_G) : 0.0f, s = amax / 448.0f;
            scale[n] = s;
            for (int k = 0; k < MOE_FP8_G; k++)
                gb[moe_off_fp8(n, k)] = s > 0.0f ? moe_f32_to_e4m3(x[k] / s) : 0;
        }
    }
}

/* an FP8 source maps onto the packed groups when no 128-group straddles two
 * column blocks (slices and K start on multiples of 128) */
static int fp8_lossless(const src_view *v)
{
    return v->src == MOE_SRC_FP8 && (v->bk % MOE_FP8_G == 0 || v->bk >= v->full_cols);
}

int moe_pack_rb(const struct moe_op *op, const moe_src_exp *s, int p, int e, int which, int rb)
{
    moe_mat m = moe_mat_of(op, p, e, which);
    if (!m.kp)
        return 0;
    src_view v = view_of(op, s, p, e, which);
    uint8_t *dst = (uint8_t *)m.w + (size_t)rb * m.rb_bytes;
    if (op->fmt == MOE_BF16 && v.src == MOE_SRC_BF16) {
        pack_bf16(&v, NULL, rb, m.kp, dst);
        return 0;
    }
    if (op->fmt == MOE_FP8 && fp8_lossless(&v)) {
        pack_fp8_copy(&v, rb, m.kp, dst);
        return 0;
    }
    if (op->fmt == MOE_INT4 && v.src == MOE_SRC_I4SYM)
        return pack_int4_i4sym(&v, rb, m.kp, dst);
    if (op->fmt == MOE_INT4 && v.src == MOE_SRC_FN && v.d->src_q4) {
        pack_int4_q4(&v, rb, m.kp, dst);
        return 0;
    }
    /* the block's rows as floats once (malloc: up to 4 MB; glibc keeps such
     * blocks in its arena after the first free), plus one full source row
     * when a whole-row INT8 scale spans partitions */
    int whole_row = op->fmt == MOE_INT8 && op->group == 0;
    size_t ntmp = whole_row && v.ncol < v.full_cols ? (size_t)v.full_cols : 0;
    float *rows = malloc(((size_t)16 * (size_t)m.kp + ntmp) * sizeof(float));
    if (!rows)
        return -1;
    float amax[16];
    stage_rows(&v, rb, m.kp, rows, whole_row ? amax : NULL, rows + (size_t)16 * m.kp);
    if (op->fmt == MOE_BF16)
        pack_bf16(&v, rows, rb, m.kp, dst);
    else if (op->fmt == MOE_INT8)
        pack_int8(&v, rb, m.kp, m.group, whole_row ? amax : NULL, rows, dst);
    else if (op->fmt == MOE_FP8)
        pack_fp8_quant(&v, rb, m.kp, rows, dst);
    else
        pack_int4(&v, rb, m.kp, rows, dst);
    free(rows);
    return 0;
}
