/*
 * mm_avx512.c - dense matmul row kernels for AVX-512 (compiled with its own
 * flags; called only when isa_current() >= ISA_AVX512).
 *
 * Four weight rows at a time share each 16-float load of x; BF16 weights are
 * widened to fp32 by a 16-bit shift, so results equal the reference up to
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

static void mm_rows_bf16(float *y, int64_t ldy, const float *x, int64_t ldx, int T, const void *W, int64_t K,
                         int64_t n0, int64_t n1)
{
    const uint16_t *w = W;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const uint16_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
                __m512 xv = _mm512_maskz_loadu_ps(m, xt + k);
                a0 = _mm512_fmadd_ps(xv, load_bf16(w0 + k, m), a0);
                a1 = _mm512_fmadd_ps(xv, load_bf16(w1 + k, m), a1);
                a2 = _mm512_fmadd_ps(xv, load_bf16(w2 + k, m), a2);
                a3 = _mm512_fmadd_ps(xv, load_bf16(w3 + k, m), a3);
            }
            float *yt = y + t * ldy + n;
            yt[0] = _mm512_reduce_add_ps(a0);
            yt[1] = _mm512_reduce_add_ps(a1);
            yt[2] = _mm512_reduce_add_ps(a2);
            yt[3] = _mm512_reduce_add_ps(a3);
        }
    }
    for (; n < n1; n++) {
        const uint16_t *w0 = w + n * K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + t * ldx;
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                __mmask16 m = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
                a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xt + k), load_bf16(w0 + k, m), a0);
            }
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
