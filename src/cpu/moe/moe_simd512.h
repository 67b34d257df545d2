/*
 * moe_simd512.h - AVX-512 pieces shared by moe_avx512.c and moe_amx.c (both
 * compiled with AVX-512 flags; never include this from a file without them).
 *
 * silu512() performs exactly the operations of the scalar moe_silu() in
 * moe_impl.h (same constants, fma steps, rounding instruction and division),
 * so for equal inputs it returns equal bits.
 */
#ifndef TD_MOE_SIMD512_H
#define TD_MOE_SIMD512_H

#include <immintrin.h>

#include "cpu/moe/moe_impl.h"

#define MOE_AI static inline __attribute__((always_inline))

MOE_AI __m512 moe_exp512(__m512 t)
{
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-MOE_EXP_CLAMP)), _mm512_set1_ps(MOE_EXP_CLAMP));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(MOE_EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-MOE_EXP_LN2_HI), t);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-MOE_EXP_LN2_LO), r);
    __m512 z = _mm512_mul_ps(r, r);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(MOE_EXP_P0), r, _mm512_set1_ps(MOE_EXP_P1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(MOE_EXP_P2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(MOE_EXP_P3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(MOE_EXP_P4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(MOE_EXP_P5));
    y = _mm512_fmadd_ps(y, z, r);
    y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

MOE_AI __m512 moe_silu512(__m512 g)
{
    __m512 t = _mm512_xor_ps(g, _mm512_set1_ps(-0.0f));
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), moe_exp512(t)));
}

/* h = silu(g) * u for 16 rows, stored as bf16 (BF16) or fp32 */
MOE_AI void moe_store_h512(int fmt, void *h, __m512 g, __m512 u)
{
    __m512 v = _mm512_mul_ps(moe_silu512(g), u);
    if (moe_act_bf16(fmt))
        _mm256_storeu_si256((__m256i *)h, (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_storeu_ps((float *)h, v);
}

/* out[c] = fma(w, y[c], out[c]) for the columns c < ncols of one 16-column block */
MOE_AI void moe_acc_out512(float *out, int col0, int ncols, float w, __m512 y)
{
    int left = ncols - col0;
    __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m512 o = _mm512_maskz_loadu_ps(m, out + col0);
    _mm512_mask_storeu_ps(out + col0, m, _mm512_fmadd_ps(_mm512_set1_ps(w), y, o));
}

/* 32 E4M3 weights, one per 16-bit word (zero-extended byte), widened to
 * bf16 exactly as moe_e4m3_to_bf16() does; sub = moe_e4m3_sub as a vector.
 * vpermw reads the low 5 bits of the word as the index, so a negative
 * subnormal (0x80..0x87) finds its magnitude like a positive one. */
MOE_AI __m512i moe_e4m3x32_bf16(__m512i z, __m512i sub)
{
    __m512i mag = _mm512_add_epi16(_mm512_slli_epi16(_mm512_and_si512(z, _mm512_set1_epi16(0x7f)), 4),
                                   _mm512_set1_epi16(0x3c00));
    mag = _mm512_mask_permutexvar_epi16(mag, _mm512_testn_epi16_mask(z, _mm512_set1_epi16(0x78)), z, sub);
    return _mm512_ternarylogic_epi32(mag, _mm512_slli_epi16(z, 8), _mm512_set1_epi16((short)0x8000), 0xf8);
}

/* a 4-byte group of activations (bf16 pair or int8 quad) in every lane */
MOE_AI __m512i moe_bcast4(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

#endif
