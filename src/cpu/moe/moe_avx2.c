/*
 * moe_avx2.c - the AVX2 kernels, for x86-64 machines without AVX-512. Same
 * packed layout as the others: a 64-byte tile row is two ymm halves (rows
 * 0-7 and 8-15). Compiled with the AVX2/FMA/F16C flags (file name).
 *
 *   BF16  no bf16 dot instruction: a packed pair is split into two fp32
 *         vectors by a 16-bit shift and a mask, and two FMAs (odd element
 *         first) accumulate, which is the reference's order and rounding.
 *   INT8  VPMADDUBSW needs one unsigned operand and saturates int16 pairs, so
 *         the u8 weights become signed q (xor 0x80) and the dot is taken as
 *         |q| x sign(x, q): pairs stay within 2 * 127 * 127 < 32767, exact;
 *         VPMADDWD with ones widens to int32. This yields D = sum x q
 *         directly (no 128 offset to remove).
 *   INT4  q in 0..15 is the unsigned operand as is (pairs <= 2 * 15 * 127).
 * With 16 ymm registers, BF16 runs 2 token rows per pass, INT8/INT4 one.
 */
#include "cpu/moe/moe_impl.h"
#include "core/isa.h"

#include <immintrin.h>

#define AI static inline __attribute__((always_inline))
#define TB2_BF16 2

AI __m256 exp256(__m256 t)
{
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-MOE_EXP_CLAMP)), _mm256_set1_ps(MOE_EXP_CLAMP));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(MOE_EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-MOE_EXP_LN2_HI), t);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-MOE_EXP_LN2_LO), r);
    __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(MOE_EXP_P0), r, _mm256_set1_ps(MOE_EXP_P1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(MOE_EXP_P2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(MOE_EXP_P3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(MOE_EXP_P4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(MOE_EXP_P5));
    y = _mm256_fmadd_ps(y, z, r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AI __m256 silu256(__m256 g)
{
    __m256 t = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(t)));
}

/* f32_to_bf16() of bf16.h on 8 lanes, widened to int32 */
AI __m256i bf16_round256(__m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, qn, nan);
}

/* h = silu(g) * u for 16 rows (two halves) */
AI void store_h(int fmt, void *h, __m256 g0, __m256 g1, __m256 u0, __m256 u1)
{
    __m256 v0 = _mm256_mul_ps(silu256(g0), u0), v1 = _mm256_mul_ps(silu256(g1), u1);
    if (fmt == MOE_BF16) {
        __m256i p = _mm256_packus_epi32(bf16_round256(v0), bf16_round256(v1));
        _mm256_storeu_si256((__m256i *)h, _mm256_permute4x64_epi64(p, 0xd8));
    } else {
        _mm256_storeu_ps((float *)h, v0);
        _mm256_storeu_ps((float *)h + 8, v1);
    }
}

/* out[c] = fma(w, y[c], out[c]) for c < ncols of one 16-column block */
AI void acc_out(float *out, int col0, int ncols, float w, __m256 y0, __m256 y1)
{
    float *o = out + col0;
    __m256 wv = _mm256_set1_ps(w);
    if (ncols - col0 >= 16) {
        _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, y0, _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(wv, y1, _mm256_loadu_ps(o + 8)));
        return;
    }
    float y[16];
    _mm256_storeu_ps(y, y0);
    _mm256_storeu_ps(y + 8, y1);
    for (int c = 0; c < ncols - col0; c++)
        o[c] = fmaf(w, y[c], o[c]);
}

AI __m256i bcast4(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* ---- cores: NM matrices x T rows; acc[(m * T + t) * 2 + half] ------------ */

AI void core_bf16(const int NM, const int T, const uint8_t *const *w, int kp, const uint16_t *x, size_t ldx,
                  __m256 *acc)
{
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int i = 0; i < NM * T * 2; i++)
        acc[i] = _mm256_setzero_ps();
    for (int kt = 0; kt < kp / 32; kt++)
        for (int r = 0; r < 16; r++) {
            __m256 xe[TB2_BF16], xo[TB2_BF16];
            for (int t = 0; t < T; t++) {
                uint32_t v;
                memcpy(&v, x + (size_t)t * ldx + kt * 32 + 2 * r, 4);
                uint32_t e = v << 16, o = v & 0xffff0000u;
                float fe, fo;
                memcpy(&fe, &e, 4);
                memcpy(&fo, &o, 4);
                xe[t] = _mm256_set1_ps(fe);
                xo[t] = _mm256_set1_ps(fo);
            }
            for (int m = 0; m < NM; m++)
                for (int h = 0; h < 2; h++) {
                    __m256i wv = _mm256_load_si256((const __m256i *)(w[m] + (size_t)kt * 1024 + r * 64 + h * 32));
                    __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
                    __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, hi));
                    for (int t = 0; t < T; t++) {
                        __m256 *a = &acc[(m * T + t) * 2 + h];
                        *a = _mm256_fmadd_ps(wo, xo[t], *a);
                        *a = _mm256_fmadd_ps(we, xe[t], *a);
                    }
                }
        }
}

/* sum over 4 bytes of a (u8) x b (s8) into int32 lanes, no saturation for
 * |a| <= 127 or a <= 15 */
AI __m256i dot4(__m256i a, __m256i b)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
}

AI void core_int8(const int NM, const uint8_t *const *w, int kp, int group, const int8_t *x, float sx, __m256 *acc)
{
    const __m256i sign = _mm256_set1_epi8((char)0x80);
    size_t gb = moe_int8_group_bytes(group);
    for (int i = 0; i < NM * 2; i++)
        acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < kp / group; g++) {
        __m256i ia[4] = { _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256() };
        for (int tl = 0; tl < group / 64; tl++)
            for (int r = 0; r < 16; r++) {
                __m256i xb = bcast4(x + (size_t)g * group + (size_t)tl * 64 + 4 * r);
                for (int m = 0; m < NM; m++)
                    for (int h = 0; h < 2; h++) {
                        __m256i q = _mm256_xor_si256(
                            _mm256_load_si256((const __m256i *)(w[m] + (size_t)g * gb + (size_t)tl * 1024 + r * 64 + h * 32)),
                            sign);
                        ia[m * 2 + h] = _mm256_add_epi32(ia[m * 2 + h], dot4(_mm256_abs_epi8(q), _mm256_sign_epi8(xb, q)));
                    }
            }
        for (int m = 0; m < NM; m++)
            for (int h = 0; h < 2; h++) {
                __m256 s = _mm256_load_ps((const float *)(w[m] + (size_t)g * gb + (size_t)group / 64 * 1024) + h * 8);
                acc[m * 2 + h] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(ia[m * 2 + h]), acc[m * 2 + h]);
            }
    }
    for (int i = 0; i < NM * 2; i++)
        acc[i] = _mm256_mul_ps(_mm256_set1_ps(sx), acc[i]);
}

AI void core_int4(const int NM, const uint8_t *const *w, int kp, const int8_t *x, const int32_t *s32, float sx,
                  __m256 *acc)
{
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int i = 0; i < NM * 2; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < kp / 32; b++) {
        __m256i ia[4] = { _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256() };
        for (int c = 0; c < 4; c++) {
            __m256i xl = bcast4(x + (size_t)b * 32 + 4 * c), xh = bcast4(x + (size_t)b * 32 + 4 * (c + 4));
            for (int m = 0; m < NM; m++)
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_load_si256((const __m256i *)(w[m] + (size_t)b * 320 + c * 64 + h * 32));
                    __m256i lo = _mm256_and_si256(v, low), hv = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    ia[m * 2 + h] = _mm256_add_epi32(ia[m * 2 + h], _mm256_add_epi32(dot4(lo, xl), dot4(hv, xh)));
                }
        }
        __m256 S = _mm256_set1_ps((float)s32[b]);
        for (int m = 0; m < NM; m++)
            for (int h = 0; h < 2; h++) {
                const uint8_t *blk = w[m] + (size_t)b * 320;
                __m256 sc = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(blk + 256 + h * 16)));
                __m256 mn = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(blk + 288 + h * 16)));
                __m256 a = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(ia[m * 2 + h]), acc[m * 2 + h]);
                acc[m * 2 + h] = _mm256_fmadd_ps(mn, S, a);
            }
    }
    for (int i = 0; i < NM * 2; i++)
        acc[i] = _mm256_mul_ps(_mm256_set1_ps(sx), acc[i]);
}

/* ---- kernels ------------------------------------------------------------ */

/* rows [i0, i0 + T) of a against row block(s) w[0..NM) -> acc */
AI void rows_dot(int fmt, const int NM, const int T, const uint8_t *const *w, const moe_mat *mat, const moe_act *a,
                 int i0, __m256 *acc)
{
    if (fmt == MOE_BF16) {
        core_bf16(NM, T, w, mat->kp, (const uint16_t *)a->x + (size_t)i0 * a->ld, a->ld, acc);
    } else if (fmt == MOE_INT8) {
        core_int8(NM, w, mat->kp, mat->group, (const int8_t *)a->x + (size_t)i0 * a->ld, a->sx[i0], acc);
    } else {
        core_int4(NM, w, mat->kp, (const int8_t *)a->x + (size_t)i0 * a->ld, a->s32 + (size_t)i0 * a->lds,
                  a->sx[i0], acc);
    }
}

static void up_bf16_t2(const uint8_t *const *w, const moe_mat *g, const moe_act *a, int i0, uint16_t *h, size_t ldh)
{
    __m256 acc[8];
    rows_dot(MOE_BF16, 2, 2, w, g, a, i0, acc);
    for (int t = 0; t < 2; t++)
        store_h(MOE_BF16, h + (size_t)t * ldh, acc[t * 2], acc[t * 2 + 1], acc[(2 + t) * 2], acc[(2 + t) * 2 + 1]);
}

static void up_one(int fmt, const uint8_t *const *w, const moe_mat *g, const moe_act *a, int i0, void *h)
{
    __m256 acc[4];
    if (fmt == MOE_BF16)
        rows_dot(MOE_BF16, 2, 1, w, g, a, i0, acc);
    else if (fmt == MOE_INT8)
        rows_dot(MOE_INT8, 2, 1, w, g, a, i0, acc);
    else
        rows_dot(MOE_INT4, 2, 1, w, g, a, i0, acc);
    store_h(fmt, h, acc[0], acc[1], acc[2], acc[3]);
}

static void avx2_up(int fmt, const moe_mat *g, const moe_mat *u, int rb0, int rb1, const moe_act *a, void *h,
                    size_t ldh, void *ts)
{
    (void)ts;
    size_t esz = fmt == MOE_BF16 ? 2 : 4;
    for (int rb = rb0; rb < rb1; rb++) {
        const uint8_t *w[2] = { g->w + (size_t)rb * g->rb_bytes, u->w + (size_t)rb * u->rb_bytes };
        int i = 0;
        if (fmt == MOE_BF16)
            for (; i + 2 <= a->m; i += 2)
                up_bf16_t2(w, g, a, i, (uint16_t *)h + (size_t)i * ldh + (size_t)rb * 16, ldh);
        for (; i < a->m; i++)
            up_one(fmt, w, g, a, i, (uint8_t *)h + ((size_t)i * ldh + (size_t)rb * 16) * esz);
    }
}

static void avx2_down(int fmt, const moe_mat *d, int rb0, int rb1, const moe_act *a, const int32_t *tok,
                      const float *wt, float *out, size_t ldo, int ncols, void *ts)
{
    (void)ts;
    for (int rb = rb0; rb < rb1 && rb * 16 < ncols; rb++) {
        const uint8_t *w[1] = { d->w + (size_t)rb * d->rb_bytes };
        int i = 0;
        if (fmt == MOE_BF16)
            for (; i + 2 <= a->m; i += 2) {
                __m256 acc[4];
                rows_dot(MOE_BF16, 1, 2, w, d, a, i, acc);
                for (int t = 0; t < 2; t++)
                    acc_out(out + (size_t)tok[i + t] * ldo, rb * 16, ncols, wt[i + t], acc[t * 2], acc[t * 2 + 1]);
            }
        for (; i < a->m; i++) {
            __m256 acc[2];
            if (fmt == MOE_BF16)
                rows_dot(MOE_BF16, 1, 1, w, d, a, i, acc);
            else if (fmt == MOE_INT8)
                rows_dot(MOE_INT8, 1, 1, w, d, a, i, acc);
            else
                rows_dot(MOE_INT4, 1, 1, w, d, a, i, acc);
            acc_out(out + (size_t)tok[i] * ldo, rb * 16, ncols, wt[i], acc[0], acc[1]);
        }
    }
}

/* FP8 has no AVX2 body: declined, so moe_pick_kernels falls back (logged) */
static int avx2_accepts(int fmt, int group)
{
    (void)group;
    return fmt != MOE_FP8;
}

const moe_kernel moe_kernel_avx2 = { "avx2", ISA_AVX2, avx2_accepts, avx2_up, avx2_down, 0 };
