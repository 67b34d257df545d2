/*
 * test_moe_tile.c - the tile kernels' INT4 path through bf16 tiles
 * (moe_tuning.i4 = 1), one kernel call at a time, against a float64
 * evaluation of exactly what that path defines: weights bf16(fma(q, s, m))
 * (fp16 scale and min per column and 32-group), int8 activations times the
 * row scale. The operator tests (test_moe.c) compare it with the exact
 * reference only within the bf16 tolerance; this one pins the layout
 * (nibble order, pair rows, staged tiles, K chunks, pairs, token tiles) to
 * fp32 summation error. Runs the tile emulator where there is AVX-512, and
 * the real AMX kernels too where there is AMX.
 */
#include "test.h"
#include "core/bf16.h"
#include "core/isa.h"
#include "cpu/moe/moe_impl.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rs = 0x2545f4914f6cdd1dull;

static uint32_t rnd(void)
{
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return (uint32_t)(rs >> 11);
}

static float unif(void) { return (float)(rnd() % 100000) / 100000.0f; }

/* a packed INT4 matrix of nrb row blocks x kp columns, random codes,
 * scales and mins; deq[n][k] = the bf16 weight the i4 path must use */
static uint8_t *make_int4(int nrb, int kp, double *deq)
{
    size_t rb = (size_t)(kp / 32) * 320;
    uint8_t *w = aligned_alloc(64, rb * (size_t)nrb);
    if (!w)
        return NULL;
    for (int b = 0; b < nrb; b++)
        for (int g = 0; g < kp / 32; g++) {
            uint8_t *blk = w + (size_t)b * rb + (size_t)g * 320;
            uint16_t sc[16], mn[16];
            for (int n = 0; n < 16; n++) {
                sc[n] = moe_f32_to_f16(0.002f + 0.02f * unif());
                mn[n] = moe_f32_to_f16(-0.15f * unif());
            }
            memcpy(blk + 256, sc, 32);
            memcpy(blk + 288, mn, 32);
            for (int i = 0; i < 256; i++)
                blk[i] = (uint8_t)(rnd() & 0xff);
            for (int n = 0; n < 16; n++)
                for (int kk = 0; kk < 32; kk++) {
                    int sh;
                    size_t o = moe_off_int4(n, g * 32 + kk, &sh) - (size_t)g * 320;
                    int q = (blk[o] >> sh) & 15;
                    float f = fmaf((float)q, f16_to_f32(sc[n]), f16_to_f32(mn[n]));
                    deq[(size_t)(b * 16 + n) * kp + g * 32 + kk] = bf16_to_f32(f32_to_bf16(f));
                }
        }
    return w;
}

/* m int8 rows of kp, tiled (rows padded to 32), row scales; xq[r][k] kept */
static int8_t *make_act(int m, int kp, int8_t *xq, float *sx, int32_t *s32)
{
    int mp = (m + 31) / 32 * 32;
    uint8_t *x = aligned_alloc(64, (size_t)mp * kp);
    if (!x)
        return NULL;
    memset(x, 0, (size_t)mp * kp);
    for (int r = 0; r < m; r++) {
        sx[r] = 0.01f + 0.02f * unif();
        for (int c = 0; c < kp / 32; c++)
            s32[(size_t)r * (kp / 32) + c] = 0;
        for (int k = 0; k < kp; k++) {
            int8_t v = (int8_t)((int)(rnd() % 255) - 127);
            xq[(size_t)r * kp + k] = v;
            moe_act_chunk(x, (size_t)kp, r, k / 64, 1)[k % 64] = (uint8_t)v;
            s32[(size_t)r * (kp / 32) + k / 32] += v;
        }
    }
    return (int8_t *)x;
}

static double dot(const int8_t *x, const double *w, int kp)
{
    double s = 0;
    for (int k = 0; k < kp; k++)
        s += (double)x[k] * w[k];
    return s;
}

/* phase 1 and phase 2 of one kernel on m rows, against float64 */
static void check_kernel(const moe_kernel *kern, int m, int kp, int ff, int kc)
{
    char what[160];
    snprintf(what, sizeof what, "%s int4 via bf16 tiles, %d rows, K %d, d_ff %d, kc %d", kern->name, m, kp, ff, kc);
    moe_tune keep = moe_tuning;
    char spec[64], err[256];
    snprintf(spec, sizeof spec, "i4=1,kc_bf16=%d,mc=32", kc);
    CHECKF(moe_tune_parse(spec, err, sizeof err) == 0, "%s", err);
    int nrb = ff / 16, orb = kp / 16;
    double *dg = malloc(sizeof(double) * (size_t)ff * kp), *du = malloc(sizeof(double) * (size_t)ff * kp);
    double *dd = malloc(sizeof(double) * (size_t)kp * ff);
    /* rows padded as the schedule pads them: the kernels read the row scale and write h for
     * the padding rows of a token tile too (zero scale there) */
    int mp = (m + 31) / 32 * 32;
    int8_t *xq = malloc((size_t)m * kp), *hq = malloc((size_t)m * ff);
    float *sx = calloc((size_t)mp, sizeof(float)), *hsx = calloc((size_t)mp, sizeof(float));
    int32_t *s32 = calloc((size_t)mp * (kp / 32), sizeof(int32_t));
    int32_t *hs32 = calloc((size_t)mp * (ff / 32), sizeof(int32_t)), *tok = malloc(sizeof(int32_t) * m);
    float *h = malloc(sizeof(float) * (size_t)mp * ff), *out = calloc((size_t)m * kp, sizeof(float));
    float *wt = malloc(sizeof(float) * m);
    void *ts = aligned_alloc(64, MOE_TSCRATCH);
    uint8_t *g = make_int4(nrb, kp, dg), *u = make_int4(nrb, kp, du), *d = make_int4(orb, ff, dd);
    int8_t *x = make_act(m, kp, xq, sx, s32);
    if (!dg || !du || !dd || !xq || !hq || !sx || !hsx || !s32 || !hs32 || !tok || !h || !out || !wt || !ts || !g ||
        !u || !d || !x) {
        CHECKF(0, "%s: out of memory", what);
        goto done;
    }
    moe_mat mg = { g, (size_t)(kp / 32) * 320, nrb, kp, 32 }, mu = { u, mg.rb_bytes, nrb, kp, 32 };
    moe_mat md = { d, (size_t)(ff / 32) * 320, orb, ff, 32 };
    moe_act a = { x, sx, s32, (size_t)kp, (size_t)(kp / 32), m };
    /* phase 1: pairs = (gate, up) row blocks, in calls of at most 8 pairs (and at least two
     * calls), as the schedule's items do */
    int step = nrb / 2 < MOE_MAXPAIR ? nrb / 2 : MOE_MAXPAIR;
    for (int rb = 0; rb < nrb; rb += step)
        kern->up(MOE_INT4, &mg, &mu, rb, rb + step < nrb ? rb + step : nrb, &a, h, (size_t)ff, ts);
    double worst = 0, top = 0;
    for (int r = 0; r < m; r++)
        for (int n = 0; n < ff; n++) {
            double gv = sx[r] * dot(xq + (size_t)r * kp, dg + (size_t)n * kp, kp);
            double uv = sx[r] * dot(xq + (size_t)r * kp, du + (size_t)n * kp, kp);
            double e = gv / (1 + exp(-gv)) * uv, got = h[(size_t)r * ff + n];
            worst = fabs(got - e) > worst ? fabs(got - e) : worst;
            top = fabs(e) > top ? fabs(e) : top;
        }
    CHECKF(worst <= 1e-5 * top, "%s: phase 1 h off by %.3g of max |h| %.3g", what, worst / top, top);
    /* phase 2: h quantised as the schedule does, each row to its own token, weight w */
    for (int r = 0; r < m; r++) {
        moe_quant_row_f32(h + (size_t)r * ff, ff, ff, hq + (size_t)r * ff, &hsx[r], hs32 + (size_t)r * (ff / 32));
        tok[r] = r;
        wt[r] = 0.5f + unif();
    }
    uint8_t *ht = aligned_alloc(64, (size_t)mp * ff);
    if (!ht) {
        CHECKF(0, "%s: out of memory", what);
        goto done;
    }
    memset(ht, 0, (size_t)mp * ff);
    for (int r = 0; r < m; r++)
        for (int k = 0; k < ff; k++)
            moe_act_chunk(ht, (size_t)ff, r, k / 64, 1)[k % 64] = (uint8_t)hq[(size_t)r * ff + k];
    moe_act ah = { ht, hsx, hs32, (size_t)ff, (size_t)(ff / 32), m };
    for (int rb = 0; rb < orb; rb += 2 * MOE_MAXPAIR) /* column groups of at most 8 pairs */
        kern->down(MOE_INT4, &md, rb, rb + 2 * MOE_MAXPAIR < orb ? rb + 2 * MOE_MAXPAIR : orb, &ah, tok, wt, out,
                   (size_t)kp, kp, ts);
    worst = 0, top = 0;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < kp; c++) {
            double e = wt[r] * hsx[r] * dot(hq + (size_t)r * ff, dd + (size_t)c * ff, ff);
            worst = fabs(out[(size_t)r * kp + c] - e) > worst ? fabs(out[(size_t)r * kp + c] - e) : worst;
            top = fabs(e) > top ? fabs(e) : top;
        }
    CHECKF(worst <= 1e-5 * top, "%s: phase 2 off by %.3g of max |out| %.3g", what, worst / top, top);
    free(ht);
done:
    moe_tuning = keep;
    free(dg), free(du), free(dd), free(xq), free(hq), free(sx), free(hsx), free(s32), free(hs32), free(tok);
    free(h), free(out), free(wt), free(ts), free(g), free(u), free(d), free(x);
}

TEST_GROUP(moe_tile)
{
    if (isa_detect() < ISA_AVX512) {
        SKIP("moe tile int4 via bf16", "the tile emulator needs AVX-512");
        return;
    }
    /* K 256 in chunks of 128 and 64 (several stagings), 2 x 2 pairs, 1..3 token tiles, a partial one */
    check_kernel(&moe_kernel_amx_emu, 40, 256, 128, 128);
    check_kernel(&moe_kernel_amx_emu, 16, 192, 64, 64);
    check_kernel(&moe_kernel_amx_emu, 70, 128, 128, 512);
    if (isa_detect() >= ISA_AMX) {
        check_kernel(&moe_kernel_amx, 40, 256, 128, 128);
        check_kernel(&moe_kernel_amx, 300, 2048, 768, 512);
    } else {
        SKIP("moe tile int4 via bf16 on AMX", "no AMX");
    }
}
