/*
 * mm_avx512.c - dense matmul row kernels for AVX-512 (compiled with its own
 * flags; called only when isa_current() >= ISA_AVX512).
 *
 * Four weight rows at a time share each load of x; BF16 weights become fp32
 * by 16-bit shifts and masks, so results equal the reference up to
 * summation order (no bf16 rounding of activations here: this is the exact
 * dense path, the MoE operator has its own reduced-precision kernels).
 */
#include "cpu/ops.h"

#include <immintrin.h>

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m)
{
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* BF16 rows, 32 columns a step: one 64-byte load holds 32 weights, whose
 * even elements become fp32 by a shift and odd ones by a mask (no widening
 * conversion: a third of the work per byte of the 16-wide step), against x
 * split into its even and odd elements by two permutes per token. The
 * products are the exact fp32 ones; only the summation order differs from
 * the reference. The tail (< 32 columns) takes the 16-wide masked step. */
static inline void step16(__m512 *acc, const uint16_t *w, const float *xt, int64_t k, int64_t K)
{
    __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
    *acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xt + k), load_bf16(w + k, m), *acc);
}

static void mm_rows_bf16(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                         int64_t n0, int64_t n1)
{
    const uint16_t *w = W;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    const int64_t K32 = K & ~(int64_t)31;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *wr[4] = { w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K };
        int t = 0;
        for (; t + 2 <= T; t += 2) { /* two tokens share each weight load */
            const float *xa = x + t * ldx, *xb = xa + ldx;
            __m512 ae[4], ao[4], be[4], bo[4];
            for (int r = 0; r < 4; r++)
                ae[r] = ao[r] = be[r] = bo[r] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K32; k += 32) {
                __m512 a0 = _mm512_loadu_ps(xa + k), a1 = _mm512_loadu_ps(xa + k + 16);
                __m512 b0 = _mm512_loadu_ps(xb + k), b1 = _mm512_loadu_ps(xb + k + 16);
                __m512 xae = _mm512_permutex2var_ps(a0, even, a1), xao = _mm512_permutex2var_ps(a0, odd, a1);
                __m512 xbe = _mm512_permutex2var_ps(b0, even, b1), xbo = _mm512_permutex2var_ps(b0, odd, b1);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m512i v = _mm512_loadu_si512(wr[r] + k);
                    __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                    __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                    ae[r] = _mm512_fmadd_ps(xae, we, ae[r]);
                    ao[r] = _mm512_fmadd_ps(xao, wo, ao[r]);
                    be[r] = _mm512_fmadd_ps(xbe, we, be[r]);
                    bo[r] = _mm512_fmadd_ps(xbo, wo, bo[r]);
                }
            }
            for (int64_t k = K32; k < K; k += 16)
                for (int r = 0; r < 4; r++) {
                    step16(&ae[r], wr[r], xa, k, K);
                    step16(&be[r], wr[r], xb, k, K);
                }
            for (int r = 0; r < 4; r++) {
                y[t * ldy + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(ae[r], ao[r]));
                y[(t + 1) * ldy + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(be[r], bo[r]));
            }
        }
        for (; t < T; t++) {
            const float *xt = x + t * ldx;
            __m512 ae[4], ao[4];
            for (int r = 0; r < 4; r++)
                ae[r] = ao[r] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K32; k += 32) {
                __m512 x0 = _mm512_loadu_ps(xt + k), x1 = _mm512_loadu_ps(xt + k + 16);
                __m512 xe = _mm512_permutex2var_ps(x0, even, x1), xo = _mm512_permutex2var_ps(x0, odd, x1);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m512i v = _mm512_loadu_si512(wr[r] + k);
                    ae[r] = _mm512_fmadd_ps(xe, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), ae[r]);
                    ao[r] = _mm512_fmadd_ps(xo, _mm512_castsi512_ps(_mm512_and_si512(v, hi)), ao[r]);
                }
            }
            for (int64_t k = K32; k < K; k += 16)
                for (int r = 0; r < 4; r++)
                    step16(&ae[r], wr[r], xt, k, K);
            float *yt = y + t * ldy + n;
            for (int r = 0; r < 4; r++)
                yt[r] = _mm512_reduce_add_ps(_mm512_add_ps(ae[r], ao[r]));
        }
    }
    for (; n < n1; n++) {
        const uint16_t *w0 = w + n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16)
                step16(&a0, w0, xt, k, K);
            y[t * ldy + n] = _mm512_reduce_add_ps(a0);
        }
    }
}

static void mm_rows_f32(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                        int64_t n0, int64_t n1)
{
    const float *w = W;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const float *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
                __m512 xv = _mm512_maskz_loadu_ps(m, xt + k);
                a0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w0 + k), a0);
                a1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w1 + k), a1);
                a2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w2 + k), a2);
                a3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w3 + k), a3);
            }
            float *yt = y + t * ldy + n;
            yt[0] = _mm512_reduce_add_ps(a0);
            yt[1] = _mm512_reduce_add_ps(a1);
            yt[2] = _mm512_reduce_add_ps(a2);
            yt[3] = _mm512_reduce_add_ps(a3);
        }
    }
    for (; n < n1; n++) {
        const float *w0 = w + n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
                a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xt + k), _mm512_maskz_loadu_ps(m, w0 + k), a0);
            }
            y[t * ldy + n] = _mm512_reduce_add_ps(a0);
        }
    }
}

const mm_kernels mm_avx512 = { mm_rows_bf16, mm_rows_f32 };
