/*
 * moe_ref.c - the scalar reference kernels: plain loops over the packed
 * layout, the truth every ISA variant is tested against (TANDEM_CPU=ref).
 *
 * They implement the numerics stated in moe.h operation for operation: the
 * integer dot products are exact, the group scales are applied with fmaf()
 * in group order, silu uses the shared moe_exp(), so the vector and tile
 * kernels of the INT formats agree with these to the bit. BF16 sums run in
 * K order by pairs, the odd element of a pair first, one rounding per
 * product (a product of two bf16 is exact in fp32): the order the Intel SDM
 * gives for VDPBF16PS, and bit-identical to it on the AVX-512 machines seen.
 */
#include "cpu/moe/moe_impl.h"
#include "core/isa.h"

/* ---- one output row of one matrix ------------------------------------- */

static float row_bf16(const moe_mat *W, int rb, int n, const uint16_t *x)
{
    const uint8_t *b = W->w + (size_t)rb * W->rb_bytes;
    float acc = 0.0f;
    for (int k = 0; k < W->kp; k += 2) {
        const uint16_t *w = (const uint16_t *)(b + moe_off_bf16(n, k));
        acc += bf16_to_f32(x[k + 1]) * bf16_to_f32(w[1]);
        acc += bf16_to_f32(x[k]) * bf16_to_f32(w[0]);
    }
    return acc;
}

/* FP8: per 128-group a sum as in row_bf16 of the weights widened to bf16
 * (exact), then fma with the group's scale */
static float row_fp8(const moe_mat *W, int rb, int n, const uint16_t *x)
{
    const uint8_t *b = W->w + (size_t)rb * W->rb_bytes;
    float acc = 0.0f;
    for (int g = 0; g < W->kp / MOE_FP8_G; g++) {
        float d = 0.0f;
        for (int k = g * MOE_FP8_G; k < (g + 1) * MOE_FP8_G; k += 2) {
            d += bf16_to_f32(x[k + 1]) * bf16_to_f32(moe_e4m3_to_bf16(b[moe_off_fp8(n, k + 1)]));
            d += bf16_to_f32(x[k]) * bf16_to_f32(moe_e4m3_to_bf16(b[moe_off_fp8(n, k)]));
        }
        float s;
        memcpy(&s, b + moe_off_fp8_scale(n, g), 4);
        acc = fmaf(s, d, acc);
    }
    return acc;
}

static float row_int8(const moe_mat *W, int rb, int n, const int8_t *x, float sx)
{
    const uint8_t *b = W->w + (size_t)rb * W->rb_bytes;
    float acc = 0.0f;
    for (int g = 0; g < W->kp / W->group; g++) {
        int32_t d = 0;
        for (int k = g * W->group; k < (g + 1) * W->group; k++)
            d += (int32_t)x[k] * ((int32_t)b[moe_off_int8(n, k, W->group)] - 128);
        float s;
        memcpy(&s, b + moe_off_int8_scale(n, g, W->group), 4);
        acc = fmaf(s, (float)d, acc);
    }
    return sx * acc;
}

static float row_int4(const moe_mat *W, int rb, int n, const int8_t *x, const int32_t *s32, float sx)
{
    const uint8_t *b = W->w + (size_t)rb * W->rb_bytes;
    float acc = 0.0f;
    for (int g = 0; g < W->kp / 32; g++) {
        int32_t d = 0;
        for (int k = g * 32; k < g * 32 + 32; k++) {
            int sh;
            size_t o = moe_off_int4(n, k, &sh);
            d += (int32_t)x[k] * ((b[o] >> sh) & 15);
        }
        const uint8_t *blk = b + (size_t)g * 320;
        uint16_t s16, m16;
        memcpy(&s16, blk + 256 + n * 2, 2);
        memcpy(&m16, blk + 288 + n * 2, 2);
        acc = fmaf(f16_to_f32(s16), (float)d, acc);
        acc = fmaf(f16_to_f32(m16), (float)s32[g], acc);
    }
    return sx * acc;
}

/* row i of the activations against output row (rb, n) of W */
static float row_dot(int fmt, const moe_mat *W, int rb, int n, const moe_act *a, int i)
{
    if (fmt == MOE_BF16)
        return row_bf16(W, rb, n, (const uint16_t *)a->x + (size_t)i * a->ld);
    if (fmt == MOE_FP8)
        return row_fp8(W, rb, n, (const uint16_t *)a->x + (size_t)i * a->ld);
    const int8_t *x = (const int8_t *)a->x + (size_t)i * a->ld;
    if (fmt == MOE_INT8)
        return row_int8(W, rb, n, x, a->sx[i]);
    return row_int4(W, rb, n, x, a->s32 + (size_t)i * a->lds, a->sx[i]);
}

static void ref_up(int fmt, const moe_mat *g, const moe_mat *u, int rb0, int rb1, const moe_act *a, void *h,
                   size_t ldh, void *ts)
{
    (void)ts;
    for (int i = 0; i < a->m; i++)
        for (int rb = rb0; rb < rb1; rb++)
            for (int n = 0; n < 16; n++) {
                float gv = row_dot(fmt, g, rb, n, a, i), uv = row_dot(fmt, u, rb, n, a, i);
                float hv = moe_silu(gv) * uv;
                size_t o = (size_t)i * ldh + (size_t)rb * 16 + (size_t)n;
                if (moe_act_bf16(fmt))
                    ((uint16_t *)h)[o] = f32_to_bf16(hv);
                else
                    ((float *)h)[o] = hv;
            }
}

static void ref_down(int fmt, const moe_mat *d, int rb0, int rb1, const moe_act *a, const int32_t *tok,
                     const float *wt, float *out, size_t ldo, int ncols, void *ts)
{
    (void)ts;
    for (int i = 0; i < a->m; i++)
        for (int rb = rb0; rb < rb1; rb++)
            for (int n = 0; n < 16; n++) {
                int col = rb * 16 + n;
                if (col >= ncols)
                    continue;
                float y = row_dot(fmt, d, rb, n, a, i);
                float *o = out + (size_t)tok[i] * ldo + (size_t)col;
                *o = fmaf(wt[i], y, *o);
            }
}

static int ref_accepts(int fmt, int group)
{
    (void)fmt;
    (void)group;
    return 1;
}

const moe_kernel moe_kernel_ref = { "ref", ISA_REF, ref_accepts, ref_up, ref_down, 0 };
